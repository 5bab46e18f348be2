"""``--format dune``: the official DUNE ``.pth`` that naver/dune's ``load_dune_from_checkpoint``
(and its hubconf) builds and loads strictly."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dune_scale.engine.export.formats.base import ExportFormat
from dune_scale.engine.export.layouts import to_official_dune
from dune_scale.engine.export.weights import StudentFileError, StudentWeights, at_resolution
from dune_scale.teachers.registry import TEACHER_SPECS


def _official_arch(weights: StudentWeights) -> str:
    arch = weights.spec.arch
    if arch == "custom" or weights.spec.patch_size != 14:
        raise StudentFileError(
            "format dune: the official DUNE loader builds vit_small / vit_base / vit_large with patch 14 only; "
            f"{weights.source} is a custom student (width {weights.spec.embed_dim}, {weights.spec.depth} blocks, "
            f"{weights.spec.num_heads} heads, patch {weights.spec.patch_size}); use --format hf"
        )
    return arch


def write_dune(weights: StudentWeights, out: Path, resolution: tuple[int, int] | None = None) -> Path:
    """The official DUNE ``.pth``: ``model`` (its key layout), ``args`` (what its loader builds
    from: image_size, enc_args, proj_args, teachers) and ``iter``."""
    weights = at_resolution(weights, resolution)
    arch = _official_arch(weights)
    spec = weights.spec
    for name, dim in spec.teacher_dims.items():
        official = TEACHER_SPECS.get(name)
        if official is None or dim != official.arch["embed_dim"] or tuple(spec.teacher_tokens[name]) != official.tokens:
            expected = f"width {official.arch['embed_dim']}, tokens {list(official.tokens)}" if official else f"one of {', '.join(TEACHER_SPECS)}"
            raise StudentFileError(
                f"format dune: teacher {name} (width {dim}, tokens {spec.teacher_tokens[name]}) is not what the official "
                f"loader builds ({expected}); use --format hf"
            )
    args = argparse.Namespace(
        image_size=spec.image_size,
        enc_args={"arch": arch, "patch_size": spec.patch_size, "num_register_tokens": spec.num_register_tokens,
                  "layerscale_init": spec.layerscale_init},
        proj_args={"num_blocks": spec.projector_depth, "num_heads": spec.num_heads, "mlp_ratio": spec.projector_mlp_ratio,
                   "layerscale_init": spec.layerscale_init},
        teachers=sorted(spec.teacher_dims),
        dune_args={"last_enc_norm": False},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    model = {k: v.contiguous() for k, v in to_official_dune(weights.state).items()}
    torch.save({"model": model, "args": args, "iter": weights.step or 0}, out)
    return out


FORMAT = ExportFormat("dune", "the official DUNE .pth (naver/dune's load_dune_from_checkpoint / hubconf)", write_dune)
