"""Composition: a validated :class:`Config` → the run's parts, in the order ``launch/train.py``
builds them (run check → loaders → teachers → student → strategy → objective → trainer). Programs
(``dune_scale.cli``) call these; nothing here parses arguments or decides exit codes.

The run check resolves the data mixture once (:class:`RunPlan`); the training loader, the
validation loaders and the benchmark's synthetic batches are all built from that plan, and each
part below receives the configuration section it needs rather than the whole tree."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dune_scale.config import Config, ConfigError, student_configs, student_subdir
from dune_scale.data.errors import DataError
from dune_scale.data.mixture import Mixture, MixtureError, resolve_mixture
from dune_scale.distill.losses import fused_distill_loss, reference_distill_loss
from dune_scale.distill.objective import DistillObjective
from dune_scale.distill.student import DuneStudent
from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpointer import Checkpointer
from dune_scale.engine.parallelize import node_sharding_problem, prepare_student, shard_frozen_module, teacher_mesh
from dune_scale.engine.pretrained import load_pretrained_student
from dune_scale.engine.rng import student_seed
from dune_scale.engine.run_files import CHECKPOINTS
from dune_scale.engine.schedules import Schedules
from dune_scale.engine.strategies import build_strategy, check_strategy
from dune_scale.engine.trainer import StudentRun, Trainer
from dune_scale.eval.periodic import FeaturePictures, PeriodicEvaluation
from dune_scale.eval.registry import ProbeSpec, parse_probe
from dune_scale.eval.validation import Validator
from dune_scale.models import vit
from dune_scale.teachers import TEACHER_SPECS, build_teacher_ensemble, get_teacher_spec
from dune_scale.teachers.ensemble import TeacherEnsemble
from dune_scale.teachers.precision import compile_frozen_blocks, resolve_teacher_precision
from dune_scale.telemetry.phases import NullPhaseTimer
from dune_scale.telemetry.reference_step import ReferenceWork, VitShape


@dataclass(frozen=True)
class RunPlan:
    """What the up-front run check established and every later part reuses (resolved once): the
    data mixture, and the per-rank batch every loader yields, which the mixture was checked against."""

    mixture: Mixture
    batch_size_per_rank: int


def check_run(cfg: Config, dist: DistInfo) -> RunPlan:
    """Everything that can be refused before a model is built or a file written: launch/option
    combinations and the data mixture against the batch size. Raises :class:`ConfigError`."""
    output_dir = Path(cfg.run.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"run.output_dir: {output_dir} is a file; give a folder (it is created if missing)")
    check_strategy(cfg, dist)
    for key, folder in (("eval.knn_train", cfg.eval.knn_train), ("eval.knn_val", cfg.eval.knn_val)):
        if folder and not Path(folder).is_dir():
            raise ConfigError(
                f"{key}: {folder!r} is not an existing folder; give an ImageFolder tree (one sub-folder per "
                "class) or MDS shards with a label column"
            )
    for spec in probe_specs(cfg):
        try:
            spec.options.check_data()
        except DataError as err:
            raise ConfigError(f"eval.probes ({spec.kind}): {err}") from None
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run.tensorboard=true needs the tensorboard package: pip install tensorboard (or leave it unset)")
    if cfg.run.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"run.wandb_project={cfg.run.wandb_project} needs the wandb package: pip install -e '.[wandb]'")
    _check_teacher_sharding(cfg.teachers.shard, dist)
    _check_teacher_entries(cfg)
    resolve_teacher_precision(cfg.teachers.dtype, cfg.teachers.residual, dist.device)  # e.g. fp8 where it cannot run
    try:
        mixture = resolve_mixture(cfg.data.mixture, cfg.data.balance, cfg.data.remote_root)
    except MixtureError as err:
        raise ConfigError(f"data.mixture: {err}") from None
    batch = cfg.train.batch_size_per_rank
    problem = mixture.batch_size_problem(batch)
    if problem:
        raise ConfigError(f"train.batch_size_per_rank: {batch!r} is not allowed; {problem}")
    return RunPlan(mixture=mixture, batch_size_per_rank=batch)


def train_loader(cfg: Config, plan: RunPlan) -> Any:
    """The training loader over the plan's mixture (Streaming is imported only here, where real data
    is read: a benchmark on synthetic batches does without it)."""
    from dune_scale.data.loader import build_train_loader

    return build_train_loader(
        cfg.data, plan.mixture, image_size=cfg.train.image_size, batch_size=plan.batch_size_per_rank,
        seed=cfg.run.seed, epoch_size=cfg.train.epoch_size,
    )


def validation_loaders(cfg: Config, plan: RunPlan, world_size: int) -> ValidationData:
    """One validation loader per dataset of the plan's mixture that has a validation split; with
    ``eval.max_batches`` each holds exactly that many batches per rank (a fixed subset), so every
    pass reads the loader to its end."""
    from dune_scale.data.loader import build_val_loader

    names = plan.mixture.validation_names
    batch = plan.batch_size_per_rank
    max_samples = cfg.eval.max_batches * batch * world_size if cfg.eval.max_batches else None
    loaders = [
        build_val_loader(cfg.data, plan.mixture, name, image_size=cfg.train.image_size, batch_size=batch,
                         max_samples=max_samples)
        for name in names
    ]
    return names, loaders


def _check_teacher_entries(cfg: Config) -> None:
    """Known teacher names and architecture settings, named by their key (not a build-time error)."""
    for i, teacher in enumerate(cfg.teachers.models):
        if teacher.name not in TEACHER_SPECS:
            raise ConfigError(
                f"teachers.models.{i}.name: {teacher.name!r} is not a known teacher; choose one of {', '.join(TEACHER_SPECS)}"
            )
        unknown = sorted(set(teacher.arch) - set(TEACHER_SPECS[teacher.name].arch_keys()))
        if unknown:
            raise ConfigError(
                f"teachers.models.{i}.arch: unknown setting(s) {', '.join(unknown)} for {teacher.name}; "
                f"known: {', '.join(TEACHER_SPECS[teacher.name].arch_keys())}"
            )


def _check_teacher_sharding(scope: str, dist: DistInfo) -> None:
    if scope == "none":
        return
    if dist.world_size == 1:
        raise ConfigError(f"teachers.shard={scope} needs several ranks; with one process the teachers are whole anyway")
    if scope == "node" and (problem := node_sharding_problem("teachers.shard", dist)):
        raise ConfigError(f"{problem} (use teachers.shard=none or world)")


def build_encoder(cfg: Config) -> vit.VisionTransformer:
    s = cfg.student
    common = dict(
        img_size=cfg.train.image_size,
        patch_size=s.patch_size,
        num_register_tokens=s.num_register_tokens,
        layerscale_init=s.layerscale_init,
        attention=s.attention,
    )
    if s.arch == "custom":
        return vit.VisionTransformer(embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads, **common)
    return vit.named_vit(s.arch, **common)


def build_student(cfg: Config, teacher_dims: dict[str, int], teacher_tokens: dict[str, tuple[str, ...]]) -> DuneStudent:
    return DuneStudent(
        build_encoder(cfg),
        teacher_dims,
        teacher_tokens,
        projector_depth=cfg.projector.depth,
        projector_mlp_ratio=cfg.projector.mlp_ratio,
        projector_layerscale_init=cfg.projector.layerscale_init,
        projector_attention=cfg.student.attention,
    )


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


def reference_work(cfg: Config) -> ReferenceWork:
    """The seed-style reference step (``telemetry.reference_step``) for ``cfg``'s teachers, image and
    batch size and student shape (width, depth, heads, registers: read off a student built on the
    meta device)."""
    size, student_patch = cfg.train.image_size, cfg.student.patch_size
    with torch.device("meta"):
        encoder = build_encoder(cfg)
    teachers = {}
    for teacher in cfg.teachers.models:
        spec = get_teacher_spec(teacher.name)
        arch = {**spec.arch, **teacher.arch}
        patch = int(arch["patch_size"])
        teachers[teacher.name] = VitShape(
            embed_dim=int(arch["embed_dim"]),
            depth=int(arch["depth"]),
            num_heads=int(arch["num_heads"]),
            patch_size=patch,
            img_size=size // student_patch * patch,
            reg_tokens=int(arch.get("num_register_tokens", 0)),
            init_values=None if spec.family == "croco" else 1e-5,  # the seed's values; speed ignores them
        )
    student = VitShape(
        embed_dim=encoder.embed_dim,
        depth=len(encoder.blocks),
        num_heads=encoder.num_heads,
        patch_size=student_patch,
        img_size=size,
        reg_tokens=encoder.num_register_tokens,
        init_values=cfg.student.layerscale_init,
    )
    return ReferenceWork(
        teachers, student, cfg.projector.depth, cfg.projector.mlp_ratio, cfg.train.batch_size_per_rank, size
    )


def build_objective(cfg: Config, teacher_names: list[str], world_size: int) -> DistillObjective:
    domains = {t.name: t.domain or get_teacher_spec(t.name).domain for t in cfg.teachers.models}
    return DistillObjective(
        teacher_names=teacher_names,
        teacher_domains=[domains[name] for name in teacher_names],
        drop_method=cfg.distill.teacher_drop,
        drop_p=cfg.distill.teacher_drop_p,
        generic_domain=cfg.distill.generic_domain,
        drop_normalise=cfg.distill.drop_normalise,
        norm_eps=cfg.distill.norm_eps,
        w_cos=cfg.loss.w_cos,
        w_sl1=cfg.loss.w_sl1,
        beta=cfg.loss.beta,
        loss_fn=fused_distill_loss if cfg.loss.fused else reference_distill_loss,
        world_size=world_size,
    )


def probe_specs(cfg: Config) -> list[ProbeSpec]:
    """``eval.probes`` read against the probe registry; ConfigError naming the entry's key."""
    specs = []
    for i, raw in enumerate(cfg.eval.probes):
        try:
            specs.append(parse_probe(raw, lambda name, i=i: f"eval.probes.{i}.{name}"))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return specs


# Validation data: dataset names and re-iterable loaders of training-style batches.
ValidationData = tuple[Sequence[str], Sequence[Iterable[Any]]]


def build_evaluation(
    cfg: Config,
    dist: DistInfo,
    teachers: Any,
    val: ValidationData | None,
    feature_pictures: FeaturePictures | None,
) -> PeriodicEvaluation | None:
    """Validation, the k-NN probe and feature pictures of every student, as the ``eval`` section
    asks; None when nothing is asked for."""
    if cfg.eval.every_steps is not None and val is None:
        raise ConfigError("eval.every_steps is set but no validation data is connected to this run")
    validator = None
    if cfg.eval.every_steps is not None:
        names, loaders = val
        validator = Validator(loaders, names, teachers, dist.device, cfg.eval.max_batches)
    probes = probe_specs(cfg)
    if validator is None and cfg.eval.knn_every_steps is None and not probes:
        return None
    return PeriodicEvaluation(cfg.eval, cfg.train.image_size, dist, validator, feature_pictures, probes)


def build_trainer(
    cfg: Config,
    dist: DistInfo,
    plan: RunPlan,
    loader: Any,
    phases: NullPhaseTimer | None = None,
    val: ValidationData | None = None,
    feature_pictures: FeaturePictures | None = None,
) -> Trainer:
    """Teachers → each student (model, strategy, objective, schedules) → trainer, for training and
    for the benchmark; ``plan`` comes from :func:`check_run`; ``val`` feeds ``eval.every_steps``."""
    torch.manual_seed(cfg.run.seed)  # identical student and random teachers on every rank
    precision = resolve_teacher_precision(cfg.teachers.dtype, cfg.teachers.residual, dist.device)
    teachers = build_teacher_ensemble(
        cfg.teachers.models, cfg.student.patch_size, dist.device, precision.compute_dtype, precision.param_dtype,
        precision.fp8, attention=cfg.teachers.attention,
    )
    compile_teachers = cfg.teachers.compile if cfg.teachers.compile is not None else dist.device.type == "cuda"
    mesh = teacher_mesh(cfg.teachers.shard, dist) if cfg.teachers.shard != "none" else None
    for teacher in teachers.teachers.values():
        if compile_teachers:
            compile_frozen_blocks(teacher.blocks)
        if mesh is not None:
            shard_frozen_module(teacher, teacher.blocks, precision.param_dtype, mesh)
    output_dir = Path(cfg.run.output_dir)
    students = [build_student_run(name, student_cfg, dist, teachers) for name, student_cfg in student_configs(cfg)]
    return Trainer(
        cfg, dist, students, teachers, loader, plan.mixture.domain_of,
        Checkpointer.from_config(output_dir / CHECKPOINTS, cfg.checkpoint, cfg.data, dist), output_dir, phases,
        build_evaluation(cfg, dist, teachers, val, feature_pictures),
    )


def build_student_run(name: str, cfg: Config, dist: DistInfo, teachers: TeacherEnsemble) -> StudentRun:
    """One student (``cfg``: its resolved configuration) placed under the run's strategy. A named
    student's initial weights depend only on ``run.seed`` and its name; the one student of a config
    without ``students:`` draws them right after the teachers, from ``run.seed``, as it always has."""
    seed = student_seed(cfg.run.seed, name)
    if name:
        torch.manual_seed(seed)
    student = build_student(cfg, teachers.embed_dims, teachers.tokens)
    if cfg.student.pretrained:
        load_pretrained_student(student, Path(cfg.student.pretrained))
    prepare_student(student, cfg.train.activation_checkpointing, cfg.train.compile, cfg.train.compile_scope == "model")
    strategy = build_strategy(cfg, dist)
    strategy.setup(student, cfg.peak_lr(dist.world_size))
    objective = build_objective(cfg, list(teachers.tokens), dist.world_size)
    output_dir = Path(cfg.run.output_dir) / student_subdir(name)
    return StudentRun(name, cfg, strategy, objective, build_schedules(cfg, dist.world_size), output_dir, seed)
