"""How far a teacher precision mode moves the features from fp32, on weights that look trained.

At initialisation DINOv2's layer-scale gammas are 1e-5: every residual branch is invisible and any
precision looks exact. Trained teachers have gammas of 0.1…1, LayerNorm gains far from 1 and a
residual stream that grows through 24 blocks, which is where bf16 rounding accumulates.
:func:`make_trained_like` fills a teacher with random values of those magnitudes;
:func:`feature_errors` compares one mode's cls/patch features with fp32's.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dune_scale.teachers.ensemble import TeacherEnsemble
from dune_scale.teachers.precision import TeacherPrecision

# Mode name → precision (see dune_scale.teachers.precision); fp8 is added on GPUs that run it.
PRECISION_MODES: dict[str, TeacherPrecision] = {
    "fp32_residual": TeacherPrecision(param_dtype=torch.float32, compute_dtype=torch.bfloat16),
    "bf16": TeacherPrecision(param_dtype=torch.bfloat16, compute_dtype=torch.bfloat16),
}
FP8_MODE = TeacherPrecision(param_dtype=torch.float32, compute_dtype=torch.bfloat16, fp8=True)


@torch.no_grad()
def make_trained_like(teacher: nn.Module, generator: torch.Generator, gamma_range: tuple[float, float] = (0.1, 1.0)) -> None:
    """Random weights with trained statistics: linear/conv weights of variance ~1/fan_in (q/k
    scaled up so attention is far from uniform), small biases, LayerNorm gains U(0.5, 1.5),
    layer-scale gammas U(gamma_range), positional embeddings and class/register tokens of O(0.1…1)."""
    for name, param in teacher.named_parameters():
        shape, leaf = param.shape, name.rsplit(".", 1)[-1]
        if leaf == "gamma":
            low, high = gamma_range
            value = torch.rand(shape, generator=generator) * (high - low) + low
        elif leaf == "weight" and param.dim() == 1:  # LayerNorm gain
            value = torch.rand(shape, generator=generator) + 0.5
        elif leaf == "weight":
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
            if name.endswith("attn.qkv.weight"):
                value[: 2 * shape[0] // 3] *= 2.0  # sharper attention: q and k rows
        elif leaf == "bias":
            value = torch.randn(shape, generator=generator) * 0.02
        elif "pos_embed" in name:
            value = torch.randn(shape, generator=generator) * 0.5
        else:  # cls / register / mask tokens
            value = torch.randn(shape, generator=generator)
        param.copy_(value.to(param.dtype))


def feature_errors(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Per-token cosine (min, mean) and max |difference|, absolute and relative to max |reference|."""
    reference, other = reference.double(), other.double()
    cos = F.cosine_similarity(other, reference, dim=-1)
    diff = (other - reference).abs().max().item()
    return {
        "cos_min": cos.min().item(),
        "cos_mean": cos.mean().item(),
        "max_abs_err": diff,
        "max_rel_err": diff / reference.abs().max().item(),
    }


FP32_MODE = TeacherPrecision(param_dtype=torch.float32, compute_dtype=torch.float32)


def mode_features(teacher: nn.Module, images: torch.Tensor, precision: TeacherPrecision) -> dict[str, torch.Tensor]:
    """cls and patch features of a copy of ``teacher`` run in ``precision``, through the ensemble
    code path training uses (images at the teacher's own patch size)."""
    from dune_scale.teachers.precision import quantize_linears_fp8

    name = "teacher"
    ensemble = TeacherEnsemble(
        {name: copy.deepcopy(teacher)}, {name: ("cls", "patch")}, teacher.patch_size, precision.compute_dtype,
        precision.param_dtype,
    )
    if precision.fp8:
        quantize_linears_fp8(ensemble.teachers[name])
    return ensemble(images)[name]


def precision_errors(
    teacher: nn.Module, images: torch.Tensor, modes: dict[str, TeacherPrecision], reference: TeacherPrecision = FP32_MODE
) -> dict[str, dict[str, dict[str, float]]]:
    """``{mode: {cls|patch: feature_errors}}`` of each mode against ``teacher`` run in ``reference``
    (default fp32, no autocast; bf16 GEMMs for what FP8 alone changes)."""
    expected = mode_features(teacher, images, reference)
    results = {}
    for mode, precision in modes.items():
        features = mode_features(teacher, images, precision)
        results[mode] = {token: feature_errors(expected[token], features[token]) for token in ("cls", "patch")}
    return results
