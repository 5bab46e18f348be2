"""Distillation losses: the PyTorch reference and the dispatch to the fused Triton kernels.

The per-token loss of DUNE is 0.5·(1 − cos(s, t')) + 0.5·mean_d smoothL1(s − t', β=1) where
t' = (t − mean) / max(std, eps) is the standardised teacher feature. It is always computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    eps: float = 1e-3,
    w_cos: float = 0.5,
    w_sl1: float = 0.5,
    beta: float = 1.0,
) -> torch.Tensor:
    """Per-image loss (B,) = token mean of the per-token loss; gradient flows to ``student`` only.

    ``student``/``teacher`` are (B, N, D) token features or (B, D) class tokens (one token);
    ``mean``/``std`` are per-channel (D,) statistics used to standardise the teacher.
    """
    _check_shapes(student, teacher, mean, std)
    if student.dim() == 2:
        student, teacher = student.unsqueeze(1), teacher.unsqueeze(1)
    s = student.float()
    with torch.no_grad():
        t = (teacher.float() - mean.float()) / std.float().clamp_min(eps)
    cos = F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    sl1 = F.smooth_l1_loss(s, t, reduction="none", beta=beta).mean(dim=-1)
    per_token = w_cos * (1.0 - cos) + w_sl1 * sl1
    return per_token.mean(dim=1)


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features differ in shape")
    if student.dim() not in (2, 3):
        raise ValueError(f"expected (B, D) or (B, N, D) features, got {tuple(student.shape)}")
    dim = student.shape[-1]
    if mean.shape != (dim,) or std.shape != (dim,):
        raise ValueError(f"mean {tuple(mean.shape)} / std {tuple(std.shape)} must both be ({dim},)")


def fused_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    eps: float = 1e-3,
    w_cos: float = 0.5,
    w_sl1: float = 0.5,
    beta: float = 1.0,
) -> torch.Tensor:
    """DESIGN §4 entry point: the Triton kernels on CUDA, the reference elsewhere."""
    if student.is_cuda:
        from kernels import triton_available

        if triton_available():
            from kernels.distill_loss import triton_distill_loss

            return triton_distill_loss(student, teacher, mean, std, eps=eps, w_cos=w_cos, w_sl1=w_sl1, beta=beta)
    return reference_distill_loss(student, teacher, mean, std, eps=eps, w_cos=w_cos, w_sl1=w_sl1, beta=beta)
