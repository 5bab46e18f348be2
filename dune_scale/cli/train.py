"""``launch/train.py``: train (or resume) a DUNE student under python, torchrun or deepspeed."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from dune_scale import distributed
from dune_scale.cli.common import run_program, setup_logging
from dune_scale.config import Config, load_config, save_config
from dune_scale.engine.compat import check_resume_compatible
from dune_scale.engine.compose import ValidationData, build_trainer, check_run, train_loader, validation_loaders
from dune_scale.engine.nonfinite import NonFiniteError
from dune_scale.engine.preemption import EXIT_PREEMPTED, PreemptionWatcher, guard_preempted_exit
from dune_scale.engine.run_files import CONFIG
from dune_scale.engine.run_folder import move_aside, refuse_silent_start_over
from dune_scale.eval.pca import feature_pictures as pca_feature_pictures
from dune_scale.eval.periodic import FeaturePictures

log = logging.getLogger("dune_scale")


def train(cfg: Config, val: ValidationData | None = None, feature_pictures: FeaturePictures | None = None) -> bool:
    """Run (or resume) the training ``cfg`` describes; False when a stop signal ended it early.

    With ``eval.every_steps``, ``val`` (dataset names, loaders) defaults to the validation splits of
    the mixture's datasets (``<remote_root>/<name>/val``) and ``feature_pictures`` to the PCA maps.
    A stop signal at any moment ends it with False: during start-up at the next of its steps (the
    run folder as it was), during training after the current step and a checkpoint."""
    preemption = PreemptionWatcher()
    preemption.install()
    built: list[Any] = []  # loaders made here, whose shared memory is freed at the end
    try:
        dist = distributed.init_distributed(cfg.run.device, cfg.strategy.collective_timeout_s)
        preemption.join_ranks()
        setup_logging(dist.is_main)
        completed = _start_and_train(cfg, dist, preemption, built, val, feature_pictures)
        distributed.barrier()  # nobody tears the process group down while a peer still uses it
    finally:
        if built:
            from dune_scale.data.loader import close_loader

            for made in built:
                close_loader(made)
        preemption.uninstall()
        distributed.shutdown()
    return completed


def _start_and_train(
    cfg: Config, dist: distributed.DistInfo, preemption: PreemptionWatcher, built: list[Any],
    val: ValidationData | None, feature_pictures: FeaturePictures | None,
) -> bool:
    """Start-up (each part checked for a stop signal on every rank), then training. The trainer
    lives only in here: its sharded modules are gone before the process group is torn down."""
    output_dir = Path(cfg.run.output_dir)

    def stopped(during: str) -> bool:
        if not preemption.should_stop():
            return False
        preemption.mark_saved()  # nothing of this run to save yet: a further signal may end it at once
        if dist.is_main:
            log.warning("stopped by a signal during %s, before training; run the same command to start again", during)
        return True

    plan = check_run(cfg, dist)  # before anything is written
    if dist.is_main:
        if cfg.checkpoint.resume == "never":
            move_aside(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    if stopped("the run check"):
        return False
    loader = train_loader(cfg, plan)
    built.append(loader)
    if cfg.eval.every_steps is not None and val is None:
        val = validation_loaders(cfg, plan, dist.world_size)
        built += val[1]
        feature_pictures = feature_pictures or pca_feature_pictures
    if stopped("loader construction"):
        return False
    trainer = build_trainer(cfg, dist, plan, loader, val=val, feature_pictures=feature_pictures)
    if stopped("model construction"):
        return False
    resume_from = trainer.checkpointer.resume_folder(cfg.checkpoint.resume)
    if resume_from is None and cfg.checkpoint.resume == "auto":
        refuse_silent_start_over(output_dir, cfg.checkpoint)
    if stopped("checkpoint verification"):
        return False
    if resume_from is not None:
        check_resume_compatible(cfg, resume_from, trainer.students[0].strategy.checkpoint_layout())
        trainer.restore(resume_from)
        if stopped("the restore"):
            return False
    if dist.is_main:  # only once the run is accepted: a refused resume leaves the old one
        save_config(cfg, output_dir / CONFIG)
    completed = trainer.fit(preemption)
    if completed:
        trainer.export_students()
    if dist.is_main:
        log.info("%s at step %d; outputs in %s", "done" if completed else "preempted", trainer.state.step, output_dir)
    return completed


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description="DUNE multi-teacher distillation (python / torchrun / deepspeed)")
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    def program() -> int:
        try:
            return 0 if train(parse_args(argv)) else EXIT_PREEMPTED
        except NonFiniteError as err:  # the run's own numbers, not the user's input: exit 1, one line
            print(f"error: {err}", file=sys.stderr)
            return 1

    code = run_program(program)
    if code == EXIT_PREEMPTED:
        guard_preempted_exit()
    return code
