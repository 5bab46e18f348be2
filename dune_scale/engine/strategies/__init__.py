"""Strategies behind one interface (``base.Strategy``): single, FSDP2, DeepSpeed ZeRO-1/2/3.

The trainer never branches on the strategy: it calls ``forward``, ``backward``, ``step``, ``save``
and ``load``. Each strategy owns its optimizer because DeepSpeed and FSDP both need to (ZeRO
partitions optimizer state, FSDP shards parameters before the optimizer sees them).
"""

from __future__ import annotations

from dune_scale.config import Config
from dune_scale.distributed import DistInfo
from dune_scale.engine.strategies.base import Strategy

__all__ = ["Strategy", "build_strategy"]


def build_strategy(cfg: Config, dist: DistInfo) -> Strategy:
    """The strategy ``strategy.name`` names (heavy imports only for the one used)."""
    name = cfg.strategy.name
    if name == "fsdp":
        from dune_scale.engine.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, dist)
    if name == "deepspeed":
        from dune_scale.engine.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, dist)
    from dune_scale.engine.strategies.single import SingleStrategy

    return SingleStrategy(cfg, dist)
