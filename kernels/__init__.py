"""Fused Triton kernels of dune_scale and their autograd wrappers.

This is the repository's own top-level ``kernels`` package (not the PyPI project of the same name).
Importing it must never fail on a machine without a GPU or without triton, because
``dune_scale.distill.losses`` asks :func:`triton_available` before choosing the fused path: every
triton import therefore happens lazily, inside the kernel modules (e.g. ``kernels.distill_loss``).
"""

from __future__ import annotations

import os

__all__ = ["triton_available"]

# The spellings triton itself reads as "true" for TRITON_INTERPRET (its C++ getenv_bool).
_TRUE_ENV = {"1", "true", "on", "yes"}


def triton_available() -> bool:
    """Whether the Triton kernels can run here: triton imports and a GPU or the CPU interpreter exists.

    The interpreter (``TRITON_INTERPRET=1``, set before the kernel modules are imported) is what lets
    CI exercise the kernels on CPU tensors.
    """
    try:
        import triton  # noqa: F401  (only probing that it imports)
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE_ENV
