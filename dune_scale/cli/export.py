"""Export a trained student: ``python launch/export.py SOURCE --format FORMAT --out PATH``.

SOURCE is a run folder (its latest complete checkpoint, else student.safetensors; with several
students, ``--student NAME`` or the folder ``students/NAME``), a checkpoint folder of any strategy, a ``student.safetensors``, an official DUNE ``.pth`` (a release, or a training ``checkpoint.pth``) or an exported folder.
``--resolution H[xW]`` exports for another input size (the positional embedding resampled once, as the
encoder resamples it at that size); ``--dynamic`` makes the ONNX graph take any size. An existing
``--out`` is replaced only with ``--force``.
A source or format that cannot work exits with code 2 and one message naming the file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from dune_scale.engine.export import FORMATS, StudentFileError, export


def resolution(text: str) -> tuple[int, int]:
    """``448`` → (448, 448); ``448x336`` → (448, 336) (height × width, pixels)."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not H or HxW in pixels (e.g. 448 or 448x336)")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def _switches() -> dict[str, tuple[str, list[str]]]:
    """Every format's switches: name → (what it is for, the formats that take it)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for fmt in FORMATS.values():
        for name, purpose in fmt.options.items():
            found.setdefault(name, (purpose, []))[1].append(fmt.name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="formats:\n" + "\n".join(f"  {f.name}: {f.help}" for f in FORMATS.values()))
    parser.add_argument("source", help="run folder, checkpoint folder, student.safetensors or DUNE .pth")
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="target format")
    parser.add_argument("--out", required=True, help="the file or folder to write (as the format writes)")
    parser.add_argument("--force", action="store_true", help="replace --out when it exists")
    parser.add_argument("--student", default=None, help="which student of a run (or checkpoint) of several")
    parser.add_argument("--resolution", type=resolution, default=None, metavar="H[xW]",
                        help="input size to export for (default: the training size; HxW with H != W: onnx only)")
    switches = _switches()
    for name, (purpose, formats) in switches.items():
        parser.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=f"{' / '.join(formats)}: {purpose}")
    args = parser.parse_args(argv)
    for name, (purpose, formats) in switches.items():
        if getattr(args, name) and args.format not in formats:
            parser.error(f"--{name.replace('_', '-')} {purpose}: use it with --format {' or '.join(formats)}")
    options = {name: getattr(args, name) for name in FORMATS[args.format].options}
    try:
        written = export(Path(args.source), args.format, Path(args.out), args.student, args.resolution, args.force, **options)
    except StudentFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0
