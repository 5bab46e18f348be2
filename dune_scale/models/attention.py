"""Scaled dot-product attention with a backend chosen at construction (timm's pattern).

``auto`` uses the ``flash-attn`` package when it is installed and the tensors suit it (CUDA,
fp16/bf16), else PyTorch's SDPA, which itself picks its cuDNN/flash kernel on GPU. ``flash-attn`` is
an optional dependency: nothing here requires it. ``math`` forces SDPA's reference kernel
(debugging, bitwise comparisons). Each attention module holds its own backend name, so the student
and the teachers can differ and nothing process-wide changes behind a module's back.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "sdpa", "flash_attn", "math")


@functools.cache
def flash_attn_installed() -> bool:
    """Cached: looked up once, not on every attention call (and not traced by torch.compile)."""
    return importlib.util.find_spec("flash_attn") is not None


def check_attention_backend(name: str) -> str:
    """``name`` if this process can run it, else a ValueError saying what to do."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if name == "flash_attn" and not flash_attn_installed():
        raise ValueError(
            "attention backend 'flash_attn' was asked for but the flash-attn package is not installed; "
            "install it or use 'auto' / 'sdpa'"
        )
    return name


def _flash_attn_suits(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ / √d) v for (B, heads, N, d) tensors with the named backend."""
    use_flash_attn = backend == "flash_attn" or (backend == "auto" and _flash_attn_suits(q) and flash_attn_installed())
    if use_flash_attn:
        if not _flash_attn_suits(q):
            raise ValueError(
                f"attention backend 'flash_attn' needs CUDA fp16/bf16 tensors with head dim <= 256, "
                f"got {q.dtype} on {q.device} with head dim {q.shape[-1]}"
            )
        from flash_attn import flash_attn_func

        # flash-attn takes (B, N, heads, d).
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "math":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
