"""Strategies behind one interface (``base.Strategy``): single, FSDP2, DeepSpeed ZeRO-1/2/3.

The trainer never branches on the strategy: it calls ``forward``, ``backward``, ``step``, ``save``
and ``load``. Each strategy owns its optimizer because DeepSpeed and FSDP both need to (ZeRO
partitions optimizer state, FSDP shards parameters before the optimizer sees them), and its
checkpoint files: the writer (``save``), the reader of a whole student (``read_model_state``,
for export), what a resume must match (``checkpoint_layout``, ``resume_problem``) and any
conversion for another rank count; and its launch rules (``check_launch``, ``options``).

:data:`STRATEGIES` is the one table of them: ``strategy.name`` is looked up there (the run check,
composition), and so is the strategy a checkpoint records (resume checks, export, conversion). A
new strategy is one module (a :class:`Strategy` subclass) and one line here. The modules import
their libraries (deepspeed) only when used.
"""

from __future__ import annotations

from dune_scale.config import Config, ConfigError, StrategyConfig
from dune_scale.distributed import DistInfo
from dune_scale.engine.strategies.base import Strategy
from dune_scale.engine.strategies.deepspeed import DeepSpeedStrategy
from dune_scale.engine.strategies.fsdp import FSDPStrategy
from dune_scale.engine.strategies.single import SingleStrategy

__all__ = ["STRATEGIES", "Strategy", "build_strategy", "check_strategy"]

STRATEGIES: dict[str, type[Strategy]] = {
    strategy.name: strategy for strategy in (SingleStrategy, FSDPStrategy, DeepSpeedStrategy)
}


def build_strategy(cfg: Config, dist: DistInfo) -> Strategy:
    """The strategy ``strategy.name`` names (checked by the run check), for one student."""
    return STRATEGIES[cfg.strategy.name](cfg, dist)


def check_strategy(cfg: Config, dist: DistInfo) -> None:
    """The run check's part of the strategy: a registered name, no other strategy's settings, and
    what the strategy itself refuses under this launch (:meth:`Strategy.check_launch`)."""
    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: {name!r} is not allowed; choose one of {' | '.join(STRATEGIES)}")
    defaults = StrategyConfig()
    for owner, strategy in STRATEGIES.items():
        for option in strategy.options if owner != name else ():
            if getattr(cfg.strategy, option) != getattr(defaults, option):
                raise ConfigError(f"strategy.{option} is set but strategy.name={name}; it only applies to {owner}")
    STRATEGIES[name].check_launch(cfg, dist)
