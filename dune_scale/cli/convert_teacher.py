"""Convert an official teacher checkpoint to safetensors + architecture JSON (never unpickled again).

  python launch/convert_teacher.py dino2reg_vitlarge_14 dinov2_vitl14_reg4_pretrain.pth checkpoints/teachers/dino2reg

writes checkpoints/teachers/dino2reg.safetensors and checkpoints/teachers/dino2reg.json; point the
teacher's ``checkpoint`` at the .safetensors file.
"""

from __future__ import annotations

import argparse

from dune_scale.cli.common import run_program
from dune_scale.teachers import TEACHER_SPECS, convert_teacher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", choices=sorted(TEACHER_SPECS))
    parser.add_argument("checkpoint", help="the official release file")
    parser.add_argument("out", help="output path without suffix (.safetensors and .json are written)")
    args = parser.parse_args(argv)

    def program() -> int:
        weights, meta = convert_teacher(args.teacher, args.checkpoint, args.out)
        print(f"wrote {weights} and {meta}")
        return 0

    return run_program(program)
