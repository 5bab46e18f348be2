"""Assemble a run in DESIGN §3's order: config → distributed → teachers → student → strategy →
loader → restore → trainer loop. ``launch/train.py`` is a thin wrapper around :func:`main`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dune_scale import distributed
from dune_scale.config import Config, ConfigError, load_config, save_config
from dune_scale.data.mixture import MixtureError, resolve_mixture
from dune_scale.distill.objective import DistillObjective
from dune_scale.distill.student import DuneStudent
from dune_scale.engine.checkpointer import CheckpointError, Checkpointer
from dune_scale.engine.compat import check_resume_compatible
from dune_scale.engine.nonfinite import NonFiniteError
from dune_scale.engine.parallelize import prepare_student, shard_frozen_module
from dune_scale.engine.preemption import EXIT_PREEMPTED
from dune_scale.engine.pretrained import PretrainedError, load_pretrained_student
from dune_scale.engine.schedules import Schedules
from dune_scale.engine.strategy import build_strategy, check_launch
from dune_scale.engine.trainer import Trainer
from dune_scale.models import vit
from dune_scale.models.attention import set_attention_backend
from dune_scale.teachers import TeacherCheckpointError, build_teacher_ensemble, get_teacher_spec
from dune_scale.telemetry.phases import NullPhaseTimer

log = logging.getLogger("dune_scale")

# Written at the end of a run: the student's full weights (stage 2 starts from this file).
STUDENT_WEIGHTS = "student.safetensors"

# Problems with what the user gave (config, checkpoints, data): one message, exit code 2.
USER_ERRORS = (ConfigError, CheckpointError, PretrainedError, MixtureError, TeacherCheckpointError)


def build_encoder(cfg: Config) -> vit.VisionTransformer:
    s = cfg.student
    common = dict(
        img_size=cfg.train.image_size,
        patch_size=s.patch_size,
        num_register_tokens=s.num_register_tokens,
        layerscale_init=s.layerscale_init,
    )
    if s.arch == "custom":
        return vit.VisionTransformer(embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads, **common)
    return getattr(vit, s.arch)(**common)


def build_student(cfg: Config, teacher_dims: dict[str, int], teacher_tokens: dict[str, tuple[str, ...]]) -> DuneStudent:
    return DuneStudent(
        build_encoder(cfg),
        teacher_dims,
        teacher_tokens,
        projector_depth=cfg.projector.depth,
        projector_mlp_ratio=cfg.projector.mlp_ratio,
        projector_layerscale_init=cfg.projector.layerscale_init,
    )


def teacher_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.teachers.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.teachers.dtype]


def build_schedules(cfg: Config, world_size: int) -> Schedules:
    total = cfg.total_steps(world_size)
    wd = cfg.optim.weight_decay
    return Schedules(
        total_steps=total,
        peak_lr=cfg.peak_lr(world_size),
        min_lr=cfg.optim.min_lr,
        warmup_steps=int(cfg.optim.warmup_fraction * total),
        weight_decay=wd,
        weight_decay_end=wd if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end,
        momentum_start=cfg.distill.norm_momentum_start,
        momentum_end=cfg.distill.norm_momentum_end,
    )


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def build_objective(cfg: Config, teacher_names: list[str]) -> DistillObjective:
    domains = {t.name: t.domain or get_teacher_spec(t.name).domain for t in cfg.teachers.models}
    return DistillObjective(
        teacher_names=teacher_names,
        teacher_domains=[domains[name] for name in teacher_names],
        drop_method=cfg.distill.teacher_drop,
        drop_p=cfg.distill.teacher_drop_p,
        generic_domain=cfg.distill.generic_domain,
        norm_eps=cfg.distill.norm_eps,
        w_cos=cfg.loss.w_cos,
        w_sl1=cfg.loss.w_sl1,
        beta=cfg.loss.beta,
        fused=cfg.loss.fused,
    )


def build_trainer(
    cfg: Config,
    dist: distributed.DistInfo,
    loader: Any,
    domain_of: Callable[[str], str],
    phases: NullPhaseTimer | None = None,
) -> Trainer:
    """Teachers → student → strategy → objective → trainer, for training and for the benchmark."""
    check_launch(cfg, dist)
    set_attention_backend(cfg.teachers.attention)
    torch.manual_seed(cfg.run.seed)  # identical student and random teachers on every rank
    dtype = teacher_dtype(cfg, dist.device)
    teachers = build_teacher_ensemble(cfg.teachers.models, cfg.student.patch_size, dist.device, dtype)
    if cfg.teachers.shard:
        for teacher in teachers.teachers.values():
            shard_frozen_module(teacher, teacher.blocks, dtype)
    student = build_student(cfg, teachers.embed_dims, teachers.tokens)
    if cfg.student.pretrained:
        load_pretrained_student(student, Path(cfg.student.pretrained))
    prepare_student(student, cfg.train.activation_checkpointing, cfg.train.compile)
    strategy = build_strategy(cfg, dist)
    strategy.setup(student, cfg.peak_lr(dist.world_size))
    output_dir = Path(cfg.run.output_dir)
    return Trainer(
        cfg, dist, strategy, teachers, build_objective(cfg, list(teachers.tokens)), loader, domain_of,
        build_schedules(cfg, dist.world_size), Checkpointer(output_dir / "checkpoints", cfg.checkpoint.keep_last, dist),
        output_dir, phases,
    )


def train(cfg: Config) -> bool:
    """Run (or resume) the training ``cfg`` describes; False when a stop signal ended it early."""
    dist = distributed.init_distributed(cfg.run.device)
    _setup_logging(dist.is_main)
    output_dir = Path(cfg.run.output_dir)
    try:
        check_launch(cfg, dist)  # before anything is written
        if dist.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        mixture = resolve_mixture(cfg.data.mixture, cfg.data.balance, cfg.data.remote_root)
        from dune_scale.data.loader import build_train_loader  # Streaming: only when real data is read

        loader = build_train_loader(
            cfg.data,
            image_size=cfg.train.image_size,
            batch_size=cfg.train.batch_size_per_rank,
            seed=cfg.run.seed,
            epoch_size=cfg.train.epoch_size,
        )
        trainer = build_trainer(cfg, dist, loader, mixture.domain_of)
        resume_from = trainer.checkpointer.resume_folder(cfg.checkpoint.resume)
        if resume_from is not None:
            check_resume_compatible(cfg, resume_from)
            trainer.restore(resume_from)
        if dist.is_main:  # only once the run is accepted: a refused resume leaves the old one
            save_config(cfg, output_dir / "config.yaml")
        completed = trainer.fit()
        if completed:
            trainer.export_student(output_dir / STUDENT_WEIGHTS)
        if dist.is_main:
            log.info("%s at step %d; outputs in %s", "done" if completed else "preempted", trainer.state.step, output_dir)
        del trainer  # sharded modules go while their process group still exists
        distributed.barrier()  # nobody tears the process group down while a peer still uses it
    finally:
        distributed.shutdown()
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
    try:
        cfg = parse_args(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        completed = train(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if completed else EXIT_PREEMPTED
