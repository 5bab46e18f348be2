"""Export a trained student: ``python launch/export.py SOURCE --format dune|timm|hf|onnx --out PATH``.

SOURCE is a run folder (its latest complete checkpoint, else student.safetensors; with several
students, ``--student NAME`` or the folder ``students/NAME``), a checkpoint folder of any strategy, a ``student.safetensors``, an official DUNE ``.pth`` (a release, or a training ``checkpoint.pth``) or an exported folder.
``--resolution H[xW]`` exports for another input size (the positional embedding resampled once, as the
encoder resamples it at that size); ``--dynamic`` makes the ONNX graph take any size.
A source or format that cannot work exits with code 2 and one message naming the file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

FORMAT_HELP = {
    "dune": "the official DUNE .pth (naver/dune's load_dune_from_checkpoint / hubconf)",
    "timm": "a timm folder: timm.create_model('local-dir:PATH', pretrained=True)",
    "hf": "a Hugging Face-style folder: model.safetensors, config.json, model card, hubconf.py (--with-onnx: model.onnx)",
    "onnx": "the encoder as ONNX (images -> cls, patch tokens), opset 18; needs the onnx extra",
}


def resolution(text: str) -> tuple[int, int]:
    """``448`` → (448, 448); ``448x336`` → (448, 336) (height × width, pixels)."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not H or HxW in pixels (e.g. 448 or 448x336)")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(f"  {k}: {v}" for k, v in FORMAT_HELP.items()))
    parser.add_argument("source", help="run folder, checkpoint folder, student.safetensors or DUNE .pth")
    parser.add_argument("--format", required=True, choices=sorted(FORMAT_HELP), help="target format")
    parser.add_argument("--out", required=True, help="output file (dune, onnx) or folder (timm, hf)")
    parser.add_argument("--student", default=None, help="which student of a run (or checkpoint) of several")
    parser.add_argument("--resolution", type=resolution, default=None, metavar="H[xW]",
                        help="input size to export for (default: the training size; HxW with H != W: onnx only)")
    parser.add_argument("--dynamic", action="store_true", help="onnx: a graph for any input size (multiples of the patch)")
    parser.add_argument("--with-onnx", action="store_true", help="hf: add model.onnx, the encoder at the folder's size")
    args = parser.parse_args(argv)
    if args.with_onnx and args.format != "hf":
        parser.error("--with-onnx adds model.onnx to an hf folder: use it with --format hf")
    if args.dynamic and not (args.format == "onnx" or args.with_onnx):
        parser.error("--dynamic is for ONNX graphs: use it with --format onnx or --format hf --with-onnx")
    options = {"onnx": {"dynamic": args.dynamic}, "hf": {"with_onnx": args.with_onnx, "dynamic": args.dynamic}}.get(args.format, {})
    from dune_scale.engine.export import StudentFileError, export

    try:
        written = export(Path(args.source), args.format, Path(args.out), args.student, args.resolution, **options)
    except StudentFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0
