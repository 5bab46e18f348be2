"""Validation: each field's own rule (choices, minimum, finite, pattern), then the rules that relate
several fields; the first impossible setting raises one :class:`ConfigError` naming it."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from dune_scale.config.sections import ARCH_SHAPE_KEYS, SHARED_STUDENT_KEYS, TOKEN_TYPES, Config, ConfigError
from dune_scale.config.typed import build_section, join_key, resolve_student_dicts


def validate(config: Config) -> None:
    """Raise :class:`ConfigError` naming the first impossible setting. With ``students:``, the
    top-level sections are a template: the rules apply to each student's merged configuration."""
    _check_fields(config, "")
    if config.students:
        _check_students(config)
        return
    for rule in _RULES:
        rule(config)


def _check_fields(node: Any, prefix: str) -> None:
    for fld in dataclasses.fields(node):
        key, value = join_key(prefix, fld.name), getattr(node, fld.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_fields(item, f"{key}.{i}")
        choices = fld.metadata.get("choices")
        if choices is not None and value not in choices:
            allowed = " | ".join(str(c) for c in choices)
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {allowed}")
        minimum = fld.metadata.get("min")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key}: {value!r} is too small; it must be at least {minimum}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not allowed; it must be a finite number")
        pattern = fld.metadata.get("pattern")
        if pattern is not None and value is not None and not re.fullmatch(pattern, value):
            raise ConfigError(f"{key}: {value!r} is not allowed; it must be {fld.metadata['allowed']}")


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def _check_image_size(config: Config) -> None:
    size, patch = config.train.image_size, config.student.patch_size
    if size <= 0 or size % patch:
        lower, upper = (size // patch) * patch, (size // patch + 1) * patch
        _fail("train.image_size", size, f"it must be a positive multiple of student.patch_size={patch} (e.g. {lower or patch} or {upper})")


def _check_student(config: Config) -> None:
    s = config.student
    custom = {name: getattr(s, name) for name in ARCH_SHAPE_KEYS}
    if s.arch == "custom":
        for name, value in custom.items():
            if value is None or value < 1:
                _fail(f"student.{name}", value, "student.arch=custom needs embed_dim, depth and num_heads ≥ 1")
        if s.embed_dim % s.num_heads:
            _fail("student.num_heads", s.num_heads, f"it must divide student.embed_dim={s.embed_dim}")
    else:
        for name, value in custom.items():
            if value is not None:
                _fail(f"student.{name}", value, f"only student.arch=custom takes it (arch is {s.arch}); leave it unset")
    if config.train.stage == 2 and not s.pretrained:
        _fail("student.pretrained", s.pretrained, "train.stage=2 starts from a stage-1 or released DUNE checkpoint: set its path")


def _check_teachers(config: Config) -> None:
    models = config.teachers.models
    if not models:
        _fail("teachers.models", models, "list at least one teacher (name + checkpoint)")
    names = [t.name for t in models]
    for i, teacher in enumerate(models):
        key = f"teachers.models.{i}"
        if not teacher.name:
            _fail(f"{key}.name", teacher.name, "name the teacher (e.g. dino2reg_vitlarge_14)")
        if names.count(teacher.name) > 1:
            _fail(f"{key}.name", teacher.name, "each teacher may appear once")
        if teacher.checkpoint is None and not teacher.random_init:
            _fail(f"{key}.checkpoint", None, "give the teacher's checkpoint path (random weights need random_init: true)")
        if teacher.checkpoint is not None and teacher.random_init:
            _fail(f"{key}.random_init", True, f"a checkpoint is given ({teacher.checkpoint}); random_init must be false")
        for token in teacher.tokens:
            if token not in TOKEN_TYPES:
                _fail(f"{key}.tokens", teacher.tokens, "token types are cls and patch")


def _check_speed_switches(config: Config) -> None:
    t = config.teachers
    if t.residual == "bf16" and t.dtype == "fp32":
        _fail("teachers.residual", t.residual, "with teachers.dtype=fp32 everything is fp32; use residual=fp32 or dtype=bf16")
    if t.cuda_graphs:
        _fail("teachers.cuda_graphs", t.cuda_graphs, "CUDA-graph teachers failed their GPU test on an H200 (BENCHMARKS.md, "
              "gpu-check 2026-11-28) and would save little: a teacher's kernels take milliseconds, their launches "
              "microseconds; leave it false")


def _check_ranges(config: Config) -> None:
    d, o, t = config.distill, config.optim, config.train
    if not 0.0 <= d.teacher_drop_p <= 1.0:
        _fail("distill.teacher_drop_p", d.teacher_drop_p, "a probability in [0, 1]")
    if not 0.0 <= o.warmup_fraction < 1.0:
        _fail("optim.warmup_fraction", o.warmup_fraction, "a fraction in [0, 1)")
    if not (math.isfinite(o.base_lr) and o.base_lr > 0):
        _fail("optim.base_lr", o.base_lr, "a finite learning rate > 0")
    if not (math.isfinite(o.min_lr) and 0 <= o.min_lr <= o.base_lr):
        _fail("optim.min_lr", o.min_lr, f"a finite learning rate with 0 ≤ min_lr ≤ base_lr={o.base_lr}")
    if o.grad_clip is not None and not (math.isfinite(o.grad_clip) and o.grad_clip > 0):
        _fail("optim.grad_clip", o.grad_clip, "a finite gradient-norm limit > 0, or none for no clipping")
    for i, beta in enumerate(o.betas):
        if not 0.0 <= beta < 1.0:
            _fail(f"optim.betas.{i}", beta, "each beta must be in [0, 1)")
    if not (math.isfinite(o.eps) and o.eps > 0):
        _fail("optim.eps", o.eps, "a finite epsilon > 0")
    for key, value in (("optim.weight_decay", o.weight_decay), ("optim.weight_decay_end", o.weight_decay_end)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            _fail(key, value, "a finite weight decay ≥ 0")
    if t.epochs <= 0:
        _fail("train.epochs", t.epochs, "a positive number of epochs")
    for key, value in (("train.max_steps", t.max_steps), ("train.total_steps", t.total_steps)):
        if value is not None and value < 1:
            _fail(key, value, "a positive number of steps (or leave it unset)")
    lo, hi = config.data.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        _fail("data.crop_scale", [lo, hi], "0 < min ≤ max ≤ 1")


def parse_step_range(text: str) -> tuple[int, int]:
    """``"A:B"`` → (A, B), 1 ≤ A ≤ B; ValueError otherwise."""
    first, sep, last = text.partition(":")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"{text!r} is not A:B")
    start, stop = int(first), int(last)
    if not 1 <= start <= stop:
        raise ValueError(f"{text!r}: steps must satisfy 1 <= A <= B")
    return start, stop


def _check_eval_and_telemetry(config: Config) -> None:
    e = config.eval
    for key, value in (("eval.every_steps", e.every_steps), ("eval.max_batches", e.max_batches),
                       ("eval.knn_every_steps", e.knn_every_steps), ("eval.probe_every_steps", e.probe_every_steps)):
        if value is not None and value < 1:
            _fail(key, value, "a positive number (or leave it unset to switch it off)")
    if e.knn_temperature <= 0:
        _fail("eval.knn_temperature", e.knn_temperature, "a positive temperature (DINO uses 0.07)")
    if e.knn_every_steps is not None and not (e.knn_train and e.knn_val):
        _fail("eval.knn_every_steps", e.knn_every_steps, "it needs eval.knn_train and eval.knn_val (labelled image folders)")
    if e.probe_every_steps is not None and not e.probes:
        _fail("eval.probe_every_steps", e.probe_every_steps, "it needs eval.probes (a list of probe settings)")
    if config.run.profile_steps is not None:
        try:
            parse_step_range(config.run.profile_steps)
        except ValueError as err:
            _fail("run.profile_steps", config.run.profile_steps, f"give A:B with 1 <= A <= B ({err})")


def _check_students(config: Config) -> None:
    """Names usable as folder names, once each; every student's merged configuration valid; the
    teacher standardisation settings left to the top level (one computation shared by all)."""
    names = [entry.name for entry in config.students]
    for i, entry in enumerate(config.students):
        key = f"students.{i}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", entry.name or ""):
            _fail(f"{key}.name", entry.name, "name each student with letters, digits, '_', '.' or '-' (it names its folder)")
        if names.index(entry.name) != i:
            _fail(f"{key}.name", entry.name, "each student name may appear once")
        for section, keys in SHARED_STUDENT_KEYS.items():
            for shared in keys:
                if shared in getattr(entry, section):
                    _fail(f"{key}.{section}.{shared}", getattr(entry, section)[shared],
                          f"every student shares the one teacher pass: set it at the top level ({section}.{shared})")
    for i, (name, merged) in enumerate(resolve_student_dicts(config.to_dict())):
        try:
            student = build_section(Config, merged, "")
            _check_fields(student, "")
            for rule in _RULES:
                rule(student)
        except ConfigError as err:
            raise ConfigError(f"students.{i} ({name}): {err}") from None


def _check_positive_settings(config: Config) -> None:
    """Settings whose meaning needs a positive value (a weight may also be 0)."""
    positive = {
        "distill.norm_eps": (config.distill.norm_eps, "a positive floor for the teacher-feature std (the recipe: 1e-3)"),
        "data.download_timeout": (config.data.download_timeout, "a positive number of seconds"),
        "train.stall_timeout_s": (config.train.stall_timeout_s, "a positive number of seconds"),
        "strategy.collective_timeout_s": (config.strategy.collective_timeout_s, "a positive number of seconds (or leave it unset)"),
    }
    for key, (value, allowed) in positive.items():
        if value is not None and not value > 0:
            _fail(key, value, allowed)
    loss = config.loss
    for key, value in (("loss.w_cos", loss.w_cos), ("loss.w_sl1", loss.w_sl1)):
        if value < 0:
            _fail(key, value, "a loss weight ≥ 0")
    if loss.w_cos + loss.w_sl1 == 0:
        _fail("loss.w_cos", loss.w_cos, "loss.w_cos and loss.w_sl1 cannot both be 0 (nothing would be learned)")
    if loss.beta < 0:
        _fail("loss.beta", loss.beta, "a smooth-L1 threshold ≥ 0 (0: plain L1; the recipe: 1.0)")
    if not 0.0 <= config.data.max_corrupt_fraction <= 1.0:
        _fail("data.max_corrupt_fraction", config.data.max_corrupt_fraction, "a fraction in [0, 1]")


_RULES = (
    _check_image_size, _check_student, _check_teachers, _check_speed_switches, _check_ranges, _check_eval_and_telemetry,
    _check_positive_settings,
)
