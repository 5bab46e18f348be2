"""Typed configuration tree: YAML recipes + ``a.b=c`` overrides, validated before any work starts.

Every field is a dataclass attribute with a type; loading rejects unknown keys, wrong types and
impossible values with one :class:`ConfigError` that names the key, the value and what is allowed.
A recipe may start from another one with ``base: other.yaml`` (path relative to the recipe).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


def _choice(default: Any, *choices: Any) -> Any:
    return field(default=default, metadata={"choices": choices})


def _at_least(default: Any, minimum: float) -> Any:
    return field(default=default, metadata={"min": minimum})


@dataclass
class RunConfig:
    output_dir: str = "runs/dune"
    seed: int = 0
    device: str = _choice("auto", "auto", "cpu", "cuda")
    log_every: int = _at_least(10, 1)
    console: str = _choice("rich", "rich", "plain", "none")
    # Write each rank's sample ids per step to samples/rank_<r>.jsonl (audits data order and resume).
    log_samples: bool = False
    wandb_project: str | None = None


@dataclass
class StudentConfig:
    arch: str = _choice("vit_base", "vit_small", "vit_base", "vit_large", "custom")
    patch_size: int = _at_least(14, 1)
    # Only for arch=custom (tiny test students); the named archs fix them.
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    num_register_tokens: int = _at_least(4, 0)
    layerscale_init: float = 1e-4
    # Stage 2 starts from a stage-1 checkpoint or a released DUNE student (safetensors / .pt).
    pretrained: str | None = None


@dataclass
class ProjectorConfig:
    depth: int = _at_least(1, 1)
    mlp_ratio: float = 4.0
    layerscale_init: float = 1e-4


@dataclass
class TeacherConfig:
    name: str = ""
    checkpoint: str | None = None
    # Random weights are only for tests and the demo; it must be asked for explicitly.
    random_init: bool = False
    arch: dict[str, Any] = field(default_factory=dict)
    # Token types to distil ("cls", "patch"); empty = the teacher's DUNE default.
    tokens: list[str] = field(default_factory=list)
    # Data domain whose samples this teacher "owns" (teacher dropping own_data); empty = default.
    domain: str = ""


@dataclass
class TeachersConfig:
    models: list[TeacherConfig] = field(default_factory=list)
    dtype: str = _choice("auto", "auto", "bf16", "fp32")
    shard: bool = False
    attention: str = _choice("auto", "auto", "sdpa", "flash_attn", "math")


@dataclass
class DistillConfig:
    teacher_drop: str = _choice("lowest_loss", "lowest_loss", "none", "own_data", "own+generic_data")
    teacher_drop_p: float = 0.5
    # Images of this domain train every teacher under own+generic_data.
    generic_domain: str = "dino2"
    norm_eps: float = 1e-3
    norm_momentum_start: float = 1.0
    norm_momentum_end: float = 0.001


@dataclass
class LossConfig:
    fused: bool = True
    w_cos: float = 0.5
    w_sl1: float = 0.5
    beta: float = 1.0


@dataclass
class OptimConfig:
    base_lr: float = 3e-4
    # lr = base_lr × global_batch / lr_reference_batch (the linear scaling rule of the recipe).
    lr_reference_batch: int = _at_least(256, 1)
    min_lr: float = 1e-6
    warmup_fraction: float = 0.2
    weight_decay: float = 0.03
    # Cosine weight-decay schedule weight_decay → weight_decay_end; unset = constant (the recipe).
    weight_decay_end: float | None = None
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    # Gradient-norm limit (> 0), or none (no clipping).
    grad_clip: float | None = 1.0
    # per_param: each parameter's gradient clipped to grad_clip on its own (official DUNE);
    # global: one coefficient from the norm of all gradients.
    clip_mode: str = _choice("per_param", "per_param", "global")
    # official: only biases and 1-D tensors skip weight decay; dune_scale: tokens and pos-embed skip it too.
    wd_groups: str = _choice("official", "official", "dune_scale")


@dataclass
class TrainConfig:
    stage: int = _choice(1, 1, 2)
    image_size: int = 336
    batch_size_per_rank: int = _at_least(128, 1)
    grad_accum_steps: int = _at_least(1, 1)
    epochs: float = 100.0
    # A DUNE "epoch" is ImageNet-1k sized, whatever the mixture holds.
    epoch_size: int = _at_least(1_281_167, 1)
    max_steps: int | None = None
    total_steps: int | None = None
    precision: str = _choice("bf16", "bf16", "fp32")
    compile: bool = False
    activation_checkpointing: bool = False
    # A step whose loss or grad norm is not finite is never applied; then stop (the official code
    # exits) or skip it and go on, up to max_nonfinite_skips consecutive skipped steps.
    nonfinite: str = _choice("stop", "stop", "skip")
    max_nonfinite_skips: int = _at_least(10, 0)


@dataclass
class DataConfig:
    remote_root: str = "data/demo_shards"
    local_cache: str = ""
    mixture: Union[str, list[dict[str, Any]]] = "teacher_balanced"
    balance: str = _choice("teacher_domains", "teacher_domains", "proportional", "weights")
    num_workers: int = _at_least(8, 0)
    prefetch_factor: int = _at_least(2, 1)
    pin_memory: bool = True
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    num_canonical_nodes: int | None = None
    predownload: int | None = None
    cache_limit: str | None = None
    download_timeout: float = 60.0
    download_retry: int = _at_least(2, 0)
    s3_endpoint_url: str | None = None
    crop_scale: tuple[float, float] = (0.4, 1.0)


@dataclass
class StrategyConfig:
    name: str = _choice("single", "single", "fsdp", "deepspeed")
    zero_stage: int = _choice(2, 1, 2, 3)
    deepspeed_config: str | None = None
    reshard_after_forward: bool = True
    # FSDP compute copy of the parameters under train.precision=bf16: fp32 + autocast (as single and
    # DeepSpeed), or bf16 (cheaper all-gathers, bf16 residual stream).
    fsdp_param_dtype: str = _choice("fp32", "fp32", "bf16")
    # DeepSpeed's CPU Adam drifts 1 ulp after a reload; torch's Adam resumes bitwise.
    torch_adam: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = _at_least(1000, 1)
    keep_last: int = _at_least(3, 1)
    resume: str = "auto"  # "auto" (latest complete one in output_dir), "never", or a checkpoint path


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def global_batch_size(self, world_size: int) -> int:
        return self.train.batch_size_per_rank * self.train.grad_accum_steps * world_size

    def total_steps(self, world_size: int) -> int:
        """Length of the schedules: the recipe's epochs unless ``train.total_steps`` says otherwise."""
        if self.train.total_steps is not None:
            return self.train.total_steps
        images = self.train.epochs * self.train.epoch_size
        return max(1, math.ceil(images / self.global_batch_size(world_size)))

    def peak_lr(self, world_size: int) -> float:
        return self.optim.base_lr * self.global_batch_size(world_size) / self.optim.lr_reference_batch


# ---------------------------------------------------------------------------------------------
# Loading: YAML → nested dict → typed dataclasses


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Recipe file (optional) + ``key=value`` overrides → validated :class:`Config`."""
    raw: dict[str, Any] = _read_recipe(Path(path)) if path is not None else {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_path(raw, key.split("."), value, key)
    config = _build(Config, raw, "")
    validate(config)
    return config


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A resolved config (e.g. the ``config.yaml`` of a run) back into a validated :class:`Config`."""
    config = _build(Config, raw, "")
    validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"recipe {path} includes itself through 'base'")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_recipe(path.parent / base, seen + (path,))
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=100)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_path(raw: Any, parts: list[str], value: Any, key: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(raw, list):
        if not head.isdigit() or int(head) >= len(raw):
            raise ConfigError(f"{key}: index {head!r} is not valid for a list of {len(raw)} entries")
        if rest:
            _set_path(raw[int(head)], rest, value, key)
        else:
            raw[int(head)] = value
        return
    if not rest:
        raw[head] = value
        return
    child = raw.setdefault(head, {})
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"{key}: {head!r} holds a value, not a section")
    _set_path(child, rest, value, key)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of settings, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}; allowed keys here: {', '.join(sorted(fields))}"
        )
    values = {name: _coerce(hints[name], raw[name], _join(prefix, name), fields[name]) for name in raw}
    return cls(**values)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(hint: Any, value: Any, key: str, fld: dataclasses.Field | None = None) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # "none" spells an unset number (e.g. optim.grad_clip=none), YAML's null being awkward on a command line.
        if isinstance(value, str) and value.lower() == "none" and type(None) in args and str not in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(hint)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(hint)}), got {value!r}")
        return [_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(hint)}), got {value!r}")
        return tuple(_coerce(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    return _scalar(hint, value, key)


def _scalar(hint: type, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return {"int": "integer", "float": "number", "bool": "boolean (true/false)", "str": "string"}.get(
            hint.__name__, hint.__name__
        )
    return str(hint).replace("typing.", "")


def _plain(value: Any) -> Any:
    """Tuples → lists so the resolved config is plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Validation: field-level choices/minimums, then rules that relate several fields


def validate(config: Config) -> None:
    """Raise :class:`ConfigError` naming the first impossible setting."""
    _check_fields(config, "")
    for rule in _RULES:
        rule(config)


def _check_fields(node: Any, prefix: str) -> None:
    for fld in dataclasses.fields(node):
        key, value = _join(prefix, fld.name), getattr(node, fld.name)
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


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def _check_image_size(config: Config) -> None:
    size, patch = config.train.image_size, config.student.patch_size
    if size <= 0 or size % patch:
        lower, upper = (size // patch) * patch, (size // patch + 1) * patch
        _fail("train.image_size", size, f"it must be a positive multiple of student.patch_size={patch} (e.g. {lower or patch} or {upper})")


def _check_student(config: Config) -> None:
    s = config.student
    custom = {"embed_dim": s.embed_dim, "depth": s.depth, "num_heads": s.num_heads}
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
            if token not in ("cls", "patch"):
                _fail(f"{key}.tokens", teacher.tokens, "token types are cls and patch")


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


def _check_mixture(config: Config) -> None:
    from dune_scale.data.mixture import MixtureError, resolve_mixture

    try:
        mixture = resolve_mixture(config.data.mixture, config.data.balance, config.data.remote_root)
    except MixtureError as err:
        raise ConfigError(f"data.mixture: {err}") from None
    problem = mixture.batch_size_problem(config.train.batch_size_per_rank)
    if problem:
        _fail("train.batch_size_per_rank", config.train.batch_size_per_rank, problem)


_RULES = (_check_image_size, _check_student, _check_teachers, _check_ranges, _check_mixture)
