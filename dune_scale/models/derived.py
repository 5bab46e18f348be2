"""Values derived from a frozen module's parameters, computed once and reused until those change.

A frozen teacher at a fixed resolution recomputes the same tensors on every forward: DINOv2's
resampled positional embedding, MASt3R's RoPE tables and its patch embedding with the input
renormalisation folded in. :class:`DerivedCache` keeps one value per key (e.g. per token grid)
together with a fingerprint of the tensors it was computed from (storage, in-place version, dtype,
device): loading weights (copy or assign), ``.to()`` and in-place edits all change the fingerprint,
so a stale value is never returned. It is an attribute of its module (no global state) and caches
only for frozen sources (none requires grad: a trained parameter changes every step and, sharded
by ZeRO-3, may be re-gathered into the same storage) and never inside a ``torch.compile`` trace
(the compiled graph computes the value itself).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def _fingerprint(sources: Sequence[torch.Tensor]) -> tuple[Hashable, ...]:
    return tuple((s.untyped_storage().data_ptr(), s.storage_offset(), s._version, s.dtype, s.device) for s in sources)


class DerivedCache:
    """``get(key, sources, compute)``: ``compute()``'s value for ``key``, recomputed when ``sources`` change."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple[Hashable, ...], object]] = {}

    def get(self, key: Hashable, sources: Sequence[torch.Tensor], compute: Callable[[], T]) -> T:
        if torch.compiler.is_compiling() or any(s.requires_grad for s in sources):
            return compute()
        fingerprint = _fingerprint(sources)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == fingerprint:
            return entry[1]  # type: ignore[return-value]
        value = compute()
        self._entries[key] = (fingerprint, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
