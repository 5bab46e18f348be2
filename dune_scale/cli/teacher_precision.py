"""Teacher precision modes against fp32 on full-size, trained-like teachers (BENCHMARKS.md).

``python launch/teacher_precision.py [--teachers NAME ...] [--depth 24] [--image-size 224]
[--batch 2] [--json PATH]``: builds each teacher at full size with random weights of trained
magnitudes (``teachers.fidelity.make_trained_like``), runs it in fp32 and in each precision mode
(``fp32_residual``: the default and the official code's; ``bf16``: whole teacher in bf16; ``fp8``
where the GPU and torchao allow it) and prints the cosine and max error of cls/patch features;
FP8 also against the same teacher with bf16 GEMMs (``fp8 vs bf16``: what FP8 alone changes).
A few seconds per mode on a GPU, about a minute for all three teachers on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dune_scale.config import ConfigError
from dune_scale.teachers import TEACHER_SPECS, build_teacher
from dune_scale.teachers.fidelity import FP8_MODE, PRECISION_MODES, make_trained_like, precision_errors
from dune_scale.teachers.precision import check_fp8_supported


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="teacher features per precision mode vs fp32 (trained-like weights)")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHER_SPECS), choices=list(TEACHER_SPECS))
    parser.add_argument("--depth", type=int, default=24, help="blocks per teacher (default 24: full size)")
    parser.add_argument("--image-size", type=int, default=224, help="student-grid pixels (MASt3R gets /14·16)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.depth < 1 or args.batch < 1 or args.image_size < 14 or args.image_size % 14:
        parser.error("--depth and --batch must be ≥ 1, --image-size a positive multiple of 14")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    modes = dict(PRECISION_MODES)
    try:
        check_fp8_supported(device)
        modes["fp8"] = FP8_MODE
    except ConfigError as err:
        print(f"fp8 not measured: {err}", file=sys.stderr)
    generator = torch.Generator().manual_seed(args.seed)
    report = {"device": str(device), "torch": torch.__version__, "depth": args.depth, "batch": args.batch, "teachers": {}}
    for name in args.teachers:
        spec = TEACHER_SPECS[name]
        side = args.image_size // 14 * spec.patch_size
        images = torch.randn(args.batch, 3, side, side, generator=generator).to(device)
        teacher = build_teacher(name, depth=args.depth).requires_grad_(False)
        make_trained_like(teacher, generator)
        start = time.perf_counter()
        errors = precision_errors(teacher.to(device), images, modes)
        if "fp8" in modes:  # what FP8 alone changes: against the same teacher with bf16 GEMMs
            errors["fp8 vs bf16"] = precision_errors(teacher, images, {"fp8": FP8_MODE}, PRECISION_MODES["fp32_residual"])["fp8"]
        report["teachers"][name] = {"image_size": side, "seconds": time.perf_counter() - start, "modes": errors}
        for mode, tokens in errors.items():
            for token, e in tokens.items():
                print(
                    f"{name:26s} {mode:14s} {token:5s} cos min {e['cos_min']:.6f} mean {e['cos_mean']:.6f}  "
                    f"max|err| {e['max_abs_err']:.4g} ({100 * e['max_rel_err']:.3f}% of max|fp32|)",
                    flush=True,
                )
        del teacher
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0
