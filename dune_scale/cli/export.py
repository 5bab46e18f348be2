"""Export a trained student: ``python launch/export.py SOURCE --format dune|timm|hf --out PATH``.

SOURCE is a run folder (its latest complete checkpoint, else student.safetensors; with several
students, ``--student NAME`` or the folder ``students/NAME``), a checkpoint folder of any strategy, a ``student.safetensors``, an official DUNE ``.pth`` (a release, or a training ``checkpoint.pth``) or an exported folder.
A source or format that cannot work exits with code 2 and one message naming the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMAT_HELP = {
    "dune": "the official DUNE .pth (naver/dune's load_dune_from_checkpoint / hubconf)",
    "timm": "a timm folder: timm.create_model('local-dir:PATH', pretrained=True)",
    "hf": "a Hugging Face-style folder: model.safetensors, config.json, model card, hubconf.py",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(f"  {k}: {v}" for k, v in FORMAT_HELP.items()))
    parser.add_argument("source", help="run folder, checkpoint folder, student.safetensors or DUNE .pth")
    parser.add_argument("--format", required=True, choices=sorted(FORMAT_HELP), help="target format")
    parser.add_argument("--out", required=True, help="output file (dune) or folder (timm, hf)")
    parser.add_argument("--student", default=None, help="which student of a run (or checkpoint) of several")
    args = parser.parse_args(argv)
    from dune_scale.engine.export import StudentFileError, export

    try:
        written = export(Path(args.source), args.format, Path(args.out), args.student)
    except StudentFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0
