"""Fused 2D rotary embedding of queries and keys (CroCo / MASt3R RoPE2D), for frozen inference.

Eagerly the rotation of q and k is ~10 elementwise and ``cat`` kernels each per block (chunk,
negate, cat, two products, a sum, casts); here one program per token reads that token's q and k of
every head once, rotates them in fp32 and writes them once. Layout: inputs are (B, heads, N, d)
views with a contiguous last dimension (e.g. the permuted qkv projection); outputs are written
token-major, (B, N, heads, d) contiguous, and returned as (B, heads, N, d) views, the layout the
eager path hands to attention.

The rotation is the eager one (``dune_scale.models.croco.apply_rope_2d``): with quarters
(u_y, v_y, u_x, v_x) of each head and the cached fp32 tables cos, sin (N, d),
``out = x·cos + rotate(x)·sin`` where ``rotate(x) = (−v_y, u_y, −v_x, u_x)``. No autograd: teachers
are frozen (callers use the eager path when a gradient is needed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.distill_loss import _device_scope

__all__ = ["triton_rope_2d"]


@triton.jit
def _rope_2d_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    n_tok, heads,
    q_stride_b, q_stride_h, q_stride_n, k_stride_b, k_stride_h, k_stride_n,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tok
    n = pid % n_tok
    QUARTER: tl.constexpr = HEAD_DIM // 4
    j = tl.arange(0, HEAD_DIM)
    first_of_pair = (j // QUARTER) % 2 == 0
    partner = tl.where(first_of_pair, j + QUARTER, j - QUARTER)
    sign = tl.where(first_of_pair, -1.0, 1.0)
    cos = tl.load(cos_ptr + n * HEAD_DIM + j).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + n * HEAD_DIM + j).to(tl.float32)[None, :] * sign[None, :]
    h = tl.arange(0, BLOCK_H)
    mask = (h < heads)[:, None]
    out_offsets = ((b * n_tok + n) * heads + h[:, None]) * HEAD_DIM + j[None, :]

    q_row = q_ptr + b * q_stride_b + n * q_stride_n + h[:, None] * q_stride_h
    q = tl.load(q_row + j[None, :], mask=mask, other=0.0).to(tl.float32)
    q_pair = tl.load(q_row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(q_out_ptr + out_offsets, (q * cos + q_pair * sin).to(q_out_ptr.dtype.element_ty), mask=mask)

    k_row = k_ptr + b * k_stride_b + n * k_stride_n + h[:, None] * k_stride_h
    k = tl.load(k_row + j[None, :], mask=mask, other=0.0).to(tl.float32)
    k_pair = tl.load(k_row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(k_out_ptr + out_offsets, (k * cos + k_pair * sin).to(k_out_ptr.dtype.element_ty), mask=mask)


def triton_rope_2d(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k), each (B, heads, N, d) in the input dtype; ``cos``/``sin`` are (N, d) fp32."""
    batch, heads, n_tok, head_dim = q.shape
    if k.shape != q.shape or k.dtype != q.dtype:
        raise ValueError(f"q and k must match: {tuple(q.shape)} {q.dtype} vs {tuple(k.shape)} {k.dtype}")
    if head_dim % 4 or head_dim & (head_dim - 1):
        raise ValueError(f"the fused 2D RoPE needs a power-of-two head dimension divisible by 4, got {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a contiguous last (head) dimension")
    if cos.shape != (n_tok, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be ({n_tok}, {head_dim}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    q_out = torch.empty(batch, n_tok, heads, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty_like(q_out)
    if q_out.numel():
        with _device_scope(q):
            _rope_2d_kernel[(batch * n_tok,)](
                q, k, cos, sin, q_out, k_out, n_tok, heads,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(heads),
            )  # fmt: skip
    return q_out.transpose(1, 2), k_out.transpose(1, 2)
