"""Fused Triton forward/backward of the DUNE projector loss (DESIGN §1, §4).

Per token: ``w_cos·(1 − cos(s, t')) + w_sl1·mean_d smoothL1(s − t', beta)`` with the standardised
teacher ``t' = (t − mean) / max(std, eps)``; per image: the mean over tokens. The eager reference
(``dune_scale.distill.losses.reference_distill_loss``) materialises several fp32 copies of the
(B, N, D) features; here the forward reads S and T once and keeps only O(tokens) state for the
backward, which re-reads S and T once and writes dS. Both are memory-bound row kernels.

Numerics:
* Loads are upcast right after the load and all math runs in fp32 (fp64 when an input is fp64, so
  that ``torch.autograd.gradcheck`` can check the analytic backward). The scalar arguments
  (eps, weights, beta) reach the kernel as fp32 in both cases.
* cos matches ``torch.nn.functional.cosine_similarity(eps=1e-8)`` as torch implements it today
  (aten/native/Distance.cpp): ``Σ (s / max(|s|, eps)) · (t' / max(|t'|, eps))``, not the older
  ``s·t' / max(|s|·|t'|, eps)``. Its clamp runs in place under no_grad, so its
  gradient treats ``max(|s|, eps)`` as if it were ``|s|``:
  ``dcos/ds = t' / (cs·ct) − (s·t') / (cs²·ct) · s / |s|`` with ``cs = max(|s|, eps)``,
  ``ct = max(|t'|, eps)`` and the last factor 0 when ``s = 0``. The kernels reproduce that gradient
  (it differs from the true derivative only for ``0 < |s| < 1e-8``).
* smoothL1 follows torch: ``0.5·x²/beta`` where ``|x| < beta``, else ``|x| − 0.5·beta``; beta = 0
  is the L1 loss (torch's own special case), with derivative ``sign(x)``.
* The per-image mean over tokens is a torch reduction of the (B, N) per-token losses: deterministic
  and cheap (no atomics).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["triton_distill_loss"]

COS_EPS = 1e-8  # F.cosine_similarity's default, used by the reference loss
_MAX_BLOCK_D = 1024  # widest feature chunk per loop iteration; wider D loops over chunks
_TILE = 2048  # elements per program tile (rows × chunk): 16 per thread, two 16-byte loads of bf16
_NUM_WARPS = 4  # with _TILE: 36-64 registers on sm_90, no spills (tests compile it), many programs per SM
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _token_rows(n_rows, n_tok, BLOCK_M: tl.constexpr):
    """This program's token rows, their validity mask, and (image, token) indices in int64 (so
    row × stride cannot overflow at B·N·D > 2³¹)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    return rows, rows < n_rows, rows64 // n_tok, rows64 % n_tok


@triton.jit
def _load_chunk(s_row, t_row, mean_ptr, std_ptr, row_ok, d0, dim, eps, COMPUTE: tl.constexpr, BLOCK_D: tl.constexpr):
    """One D-chunk of student rows and standardised teacher rows, upcast to ``COMPUTE`` right after
    the loads. Masked lanes load s = t = mean = 0 and std = 1, so they add exactly 0 to every sum."""
    cols = d0 + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    m = row_ok[:, None] & col_ok[None, :]
    s = tl.load(s_row + cols[None, :], mask=m, other=0.0).to(COMPUTE)
    t = tl.load(t_row + cols[None, :], mask=m, other=0.0).to(COMPUTE)
    mu = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(COMPUTE)
    sd = tl.load(std_ptr + cols, mask=col_ok, other=1.0).to(COMPUTE)
    tn = (t - mu[None, :]) / tl.maximum(sd, eps)[None, :]
    return s, tn, cols, m


@triton.jit
def _distill_fwd_kernel(
    s_ptr, t_ptr, mean_ptr, std_ptr,
    loss_ptr, coef_t_ptr, coef_s_ptr,
    n_rows, n_tok, dim,
    s_stride_b, s_stride_n, t_stride_b, t_stride_n,
    eps, cos_eps, w_cos, w_sl1, beta, inv_beta,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per-token loss and the two per-token cosine coefficients the backward needs."""
    rows, row_ok, b, n = _token_rows(n_rows, n_tok, BLOCK_M)
    s_row = s_ptr + (b * s_stride_b + n * s_stride_n)[:, None]
    t_row = t_ptr + (b * t_stride_b + n * t_stride_n)[:, None]

    dot = tl.zeros([BLOCK_M], dtype=COMPUTE)
    ss = tl.zeros([BLOCK_M], dtype=COMPUTE)
    tt = tl.zeros([BLOCK_M], dtype=COMPUTE)
    sl1 = tl.zeros([BLOCK_M], dtype=COMPUTE)
    for d0 in range(0, dim, BLOCK_D):
        s, tn, cols, m = _load_chunk(s_row, t_row, mean_ptr, std_ptr, row_ok, d0, dim, eps, COMPUTE, BLOCK_D)
        diff = s - tn
        ad = tl.abs(diff)
        dot += tl.sum(s * tn, axis=1)
        ss += tl.sum(s * s, axis=1)
        tt += tl.sum(tn * tn, axis=1)
        sl1 += tl.sum(tl.where(ad < beta, 0.5 * diff * diff * inv_beta, ad - 0.5 * beta), axis=1)

    ns = tl.sqrt(ss)
    cs = tl.maximum(ns, cos_eps)
    ct = tl.maximum(tl.sqrt(tt), cos_eps)
    cos = dot / cs / ct  # two divisions: cs·ct could overflow fp32 where each alone does not
    loss = w_cos * (1.0 - cos) + w_sl1 * (sl1 / dim)
    # s = 0 implies dot = cos = 0, so dividing by 1 there yields the required zero coefficient.
    coef_s = cos / (cs * tl.where(ns > 0.0, ns, 1.0))
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(coef_t_ptr + rows, 1.0 / cs / ct, mask=row_ok)
    tl.store(coef_s_ptr + rows, coef_s, mask=row_ok)


@triton.jit
def _distill_bwd_kernel(
    s_ptr, t_ptr, mean_ptr, std_ptr, coef_t_ptr, coef_s_ptr, g_ptr, ds_ptr,
    n_rows, n_tok, dim,
    s_stride_b, s_stride_n, t_stride_b, t_stride_n, ds_stride_b, ds_stride_n,
    eps, w_cos, w_sl1, beta, inv_beta,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dS = g[b]/N · (−w_cos·(coef_t·t' − coef_s·s) + w_sl1/D · smoothL1'(s − t')), elementwise."""
    rows, row_ok, b, n = _token_rows(n_rows, n_tok, BLOCK_M)
    s_row = s_ptr + (b * s_stride_b + n * s_stride_n)[:, None]
    t_row = t_ptr + (b * t_stride_b + n * t_stride_n)[:, None]
    ds_row = ds_ptr + (b * ds_stride_b + n * ds_stride_n)[:, None]

    scale = tl.load(g_ptr + b, mask=row_ok, other=0.0).to(COMPUTE) / n_tok
    k_t = (w_cos * scale * tl.load(coef_t_ptr + rows, mask=row_ok, other=0.0))[:, None]
    k_s = (w_cos * scale * tl.load(coef_s_ptr + rows, mask=row_ok, other=0.0))[:, None]
    k_l1 = (w_sl1 / dim * scale)[:, None]
    for d0 in range(0, dim, BLOCK_D):
        s, tn, cols, m = _load_chunk(s_row, t_row, mean_ptr, std_ptr, row_ok, d0, dim, eps, COMPUTE, BLOCK_D)
        diff = s - tn
        sign = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
        dsl1 = tl.where(tl.abs(diff) < beta, diff * inv_beta, sign)
        ds = k_s * s - k_t * tn + k_l1 * dsl1
        tl.store(ds_row + cols[None, :], ds.to(ds_ptr.dtype.element_ty), mask=m)


def _launch_config(n_rows: int, dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D): whole rows up to 1024 channels, several rows per program for small D.

    A heuristic, not autotuned (autotuning needs a GPU and would make CI and GPU runs differ).
    Small row counts get a smaller BLOCK_M so no program is mostly masked.
    """
    block_d = max(16, min(triton.next_power_of_2(dim), _MAX_BLOCK_D))
    block_m = max(1, min(_TILE // block_d, triton.next_power_of_2(n_rows)))
    return block_m, block_d


def _device_scope(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make that the tensors' device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch_forward(
    s3: torch.Tensor,
    t3: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    loss_tok: torch.Tensor,
    coef_t: torch.Tensor,
    coef_s: torch.Tensor,
    eps: float,
    w_cos: float,
    w_sl1: float,
    beta: float,
) -> None:
    """Write per-token loss and coefficients (each a contiguous (B·N,) view) for (B, N, D) inputs.

    ``s3``/``t3`` may have any batch/token strides but unit channel stride; ``mean``/``std`` are
    contiguous (D,) tensors in the compute dtype.
    """
    bsz, n_tok, dim = s3.shape
    n_rows = bsz * n_tok
    if n_rows == 0:
        return
    block_m, block_d = _launch_config(n_rows, dim)
    with _device_scope(s3):
        _distill_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            s3, t3, mean, std, loss_tok, coef_t, coef_s,
            n_rows, n_tok, dim,
            s3.stride(0), s3.stride(1), t3.stride(0), t3.stride(1),
            eps, COS_EPS, w_cos, w_sl1, beta, 1.0 / beta if beta > 0 else 0.0,
            COMPUTE=_tl_dtype(loss_tok.dtype), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=_NUM_WARPS,
        )  # fmt: skip


def _launch_backward(
    s3: torch.Tensor,
    t3: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    coef_t: torch.Tensor,
    coef_s: torch.Tensor,
    grad_img: torch.Tensor,
    grad_s3: torch.Tensor,
    eps: float,
    w_cos: float,
    w_sl1: float,
    beta: float,
) -> None:
    """Write dS into ``grad_s3`` ((B, N, D), unit channel stride) from the per-image grad (B,)."""
    bsz, n_tok, dim = s3.shape
    n_rows = bsz * n_tok
    if n_rows == 0:
        return
    block_m, block_d = _launch_config(n_rows, dim)
    with _device_scope(s3):
        _distill_bwd_kernel[(triton.cdiv(n_rows, block_m),)](
            s3, t3, mean, std, coef_t, coef_s, grad_img, grad_s3,
            n_rows, n_tok, dim,
            s3.stride(0), s3.stride(1), t3.stride(0), t3.stride(1), grad_s3.stride(0), grad_s3.stride(1),
            eps, w_cos, w_sl1, beta, 1.0 / beta if beta > 0 else 0.0,
            COMPUTE=_tl_dtype(coef_t.dtype), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=_NUM_WARPS,
        )  # fmt: skip


def _tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) view with unit channel stride: (B, D) becomes N = 1; other layouts are copied."""
    x3 = x.unsqueeze(1) if x.dim() == 2 else x
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


class _DistillLoss(torch.autograd.Function):
    """Per-image loss (B,) with the gradient to the student only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        eps: float,
        w_cos: float,
        w_sl1: float,
        beta: float,
    ) -> torch.Tensor:
        compute = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
        s3, t3 = _as_rows(student), _as_rows(teacher)
        mean_c, std_c = mean.to(compute).contiguous(), std.to(compute).contiguous()
        bsz, n_tok, _ = s3.shape
        per_token = torch.empty(3, bsz * n_tok, dtype=compute, device=student.device)
        loss_tok, coef_t, coef_s = per_token.unbind(0)
        _launch_forward(s3, t3, mean_c, std_c, loss_tok, coef_t, coef_s, eps, w_cos, w_sl1, beta)
        ctx.save_for_backward(s3, t3, mean_c, std_c, coef_t, coef_s)
        ctx.hparams = (eps, w_cos, w_sl1, beta)
        ctx.student_shape, ctx.student_dtype = student.shape, student.dtype
        return loss_tok.view(bsz, n_tok).mean(dim=1)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_img: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        s3, t3, mean_c, std_c, coef_t, coef_s = ctx.saved_tensors
        grad_s3 = torch.empty(s3.shape, dtype=ctx.student_dtype, device=s3.device)
        # The incoming grad may be an expanded (stride-0) view, e.g. from .sum().
        grad_img = grad_img.to(coef_t.dtype).contiguous()
        _launch_backward(s3, t3, mean_c, std_c, coef_t, coef_s, grad_img, grad_s3, *ctx.hparams)
        return grad_s3.view(ctx.student_shape), None, None, None, None, None, None, None


def _check_inputs(
    student: torch.Tensor, teacher: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, beta: float
) -> None:
    """Fail early with a clear message: the kernels trust shapes and devices and check no bounds."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features differ in shape")
    if student.dim() not in (2, 3):
        raise ValueError(f"expected (B, D) or (B, N, D) features, got {tuple(student.shape)}")
    dim = student.shape[-1]
    if dim == 0:
        raise ValueError("features must have at least one channel")
    if mean.shape != (dim,) or std.shape != (dim,):
        raise ValueError(f"mean {tuple(mean.shape)} / std {tuple(std.shape)} must both be ({dim},)")
    for name, x in (("student", student), ("teacher", teacher), ("mean", mean), ("std", std)):
        if x.dtype not in _SUPPORTED:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: {', '.join(map(str, _SUPPORTED))}")
        if x.device != student.device:
            raise ValueError(f"{name} is on {x.device}, student on {student.device}")
    if beta < 0:
        raise ValueError(f"smooth-L1 beta must be >= 0, got {beta}")
    if not student.is_cuda and isinstance(_distill_fwd_kernel, triton.runtime.JITFunction):
        raise RuntimeError(
            "the Triton distillation loss needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before kernels.distill_loss is imported"
        )


def triton_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    eps: float = 1e-3,
    w_cos: float = 0.5,
    w_sl1: float = 0.5,
    beta: float = 1.0,
) -> torch.Tensor:
    """Fused ``reference_distill_loss``: per-image loss (B,), gradient to ``student`` only.

    ``student``/``teacher``: (B, N, D) tokens or (B, D) class tokens, fp32/bf16/fp16 (fp64 for
    checks); any batch/token strides, channel stride 1 (else copied). ``mean``/``std``: (D,).
    Returns fp32 (fp64 for fp64 inputs); the student gradient has the student's dtype.
    """
    _check_inputs(student, teacher, mean, std, beta)
    return _DistillLoss.apply(student, teacher.detach(), mean.detach(), std.detach(), eps, w_cos, w_sl1, beta)
