"""Typed configuration tree: YAML recipes + ``a.b=c`` overrides, validated before any work starts.

Every field is a dataclass attribute with a type; loading rejects unknown keys, wrong types and
impossible values with one :class:`ConfigError` that names the key, the value and what is allowed.
A recipe may start from another one with ``base: other.yaml`` (next to the recipe, else a shipped
recipe). A layer that names ``student.arch`` brings that architecture's shape: the custom
``embed_dim``/``depth``/``num_heads`` of the layers below it (a base recipe, the recipe under
command-line overrides, the top level under a ``students:`` entry) are dropped.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

# The token types a teacher can be distilled on: its class token and its patch tokens.
TOKEN_TYPES = ("cls", "patch")


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


def _choice(default: Any, *choices: Any) -> Any:
    return field(default=default, metadata={"choices": choices})


def _choice_with_aliases(default: Any, choices: tuple[Any, ...], aliases: dict[Any, Any]) -> Any:
    """A choice that also accepts older spellings (e.g. ``true``), read as their current value."""
    return field(default=default, metadata={"choices": choices, "aliases": aliases})


def _at_least(default: Any, minimum: float) -> Any:
    return field(default=default, metadata={"min": minimum})


def _matching(default: Any, pattern: str, allowed: str) -> Any:
    """A string that is unset or matches ``pattern`` (``allowed`` says what that means)."""
    return field(default=default, metadata={"pattern": pattern, "allowed": allowed})


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
    # TensorBoard event files under <output_dir>/tensorboard: true, false, or unset = when installed.
    tensorboard: bool | None = None
    # "A:B": a torch.profiler trace of steps A..B (and a CUDA memory snapshot on GPU) under profiles/.
    profile_steps: str | None = None


@dataclass
class StudentConfig:
    arch: str = _choice("vit_base", "vit_small", "vit_base", "vit_large", "custom")
    patch_size: int = _at_least(14, 1)
    # Only for arch=custom (tiny test students); the named archs fix them (ARCH_SHAPE_KEYS).
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    num_register_tokens: int = _at_least(4, 0)
    layerscale_init: float = 1e-4
    # Stage 2 starts from a stage-1 checkpoint or a released DUNE student (safetensors / .pt).
    pretrained: str | None = None
    # Attention backend of the encoder and the projectors (teachers.attention is the teachers').
    attention: str = _choice("auto", "auto", "sdpa", "flash_attn", "math")


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
    # GEMM precision: auto = bf16 on CUDA, fp32 on CPU; fp8 = torchao float8 linears, per-row scales
    # (CUDA compute capability ≥ 8.9 with torchao installed; refused elsewhere).
    dtype: str = _choice("auto", "auto", "bf16", "fp32", "fp8")
    # Everything but the GEMMs: fp32 = the official code (fp32 weights under autocast: norms, layer
    # scales, positional embeddings and the residual stream in fp32); bf16 = whole teachers in bf16.
    residual: str = _choice("fp32", "fp32", "bf16")
    # Compile each teacher block (unset: on CUDA, where it pays; off on CPU).
    compile: bool | None = None
    # Refused (kept so that earlier runs' config.yaml still load): replaying the compiled blocks as
    # CUDA graphs failed on the GPU and would save little there (BENCHMARKS.md).
    cuda_graphs: bool = False
    # Where each frozen teacher is FSDP2-sharded: not at all (a full copy per rank), over all ranks,
    # or within each node and replicated across nodes (weight all-gathers stay on the node's links).
    shard: str = _choice_with_aliases("none", ("none", "world", "node"), {True: "world", False: "none"})
    attention: str = _choice("auto", "auto", "sdpa", "flash_attn", "math")


@dataclass
class DistillConfig:
    teacher_drop: str = _choice("lowest_loss", "lowest_loss", "none", "own_data", "own+generic_data")
    teacher_drop_p: float = 0.5
    # Images of this domain train every teacher under own+generic_data.
    generic_domain: str = "dino2"
    # The dropping coefficients sum to one over each rank's batch (per_rank: the official rule, the
    # strategies then average the ranks' gradients as DDP does), or over the global batch (global).
    drop_normalise: str = _choice("per_rank", "per_rank", "global")
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
    # What train.compile compiles: each transformer block, or the whole student with its projectors
    # as one graph (fusion across blocks; single and deepspeed strategies: FSDP2 compiles per block).
    compile_scope: str = _choice("blocks", "blocks", "model")
    activation_checkpointing: bool = False
    # A step whose loss or grad norm is not finite is never applied; then stop (the official code
    # exits) or skip it and go on, up to max_nonfinite_skips consecutive skipped steps.
    nonfinite: str = _choice("stop", "stop", "skip")
    max_nonfinite_skips: int = _at_least(10, 0)
    # A rank on which no batch and no optimizer step completes for this long (after the first step)
    # writes every thread's stack to stall_rank<R>.txt and ends the job.
    stall_timeout_s: float = 900.0


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
    # Undecodable images beyond this share of the samples read (at least of those the shards hold) stop the run.
    max_corrupt_fraction: float = 0.01


@dataclass
class StrategyConfig:
    # One of the strategies registered in dune_scale.engine.strategies (checked by the run check).
    name: str = "single"
    zero_stage: int = _choice(2, 1, 2, 3)
    deepspeed_config: str | None = None
    reshard_after_forward: bool = True
    # FSDP compute copy of the parameters under train.precision=bf16: fp32 + autocast (as single and
    # DeepSpeed), or bf16 (cheaper all-gathers, bf16 residual stream).
    fsdp_param_dtype: str = _choice("fp32", "fp32", "bf16")
    # FSDP2 student sharding: over all ranks, or within each node and replicated across nodes (HSDP:
    # parameter all-gathers stay on the node's links; gradients are all-reduced across nodes).
    fsdp_shard: str = _choice("world", "world", "node")
    # Seconds a collective may wait for the other ranks (unset: torch's default).
    collective_timeout_s: float | None = None


@dataclass
class CheckpointConfig:
    every_steps: int = _at_least(1000, 1)
    keep_last: int = _at_least(3, 1)
    resume: str = "auto"  # "auto" (latest complete one in output_dir), "never", or a checkpoint path
    # Also keep every complete checkpoint in object storage (credentials and endpoint as for data):
    # keep_last applies there too, and resume=auto falls back to it when the local disk has none.
    remote: str | None = _matching(None, r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?", "an s3://bucket/prefix URL")
    # Write (FSDP: DCP async_save), hash and upload checkpoints while training goes on.
    async_save: bool = False


@dataclass
class EvalConfig:
    # Held-out validation every N optimizer steps and at the end (unset: no validation).
    every_steps: int | None = None
    # Per rank and validation loader: bounds the cost of one validation (unset: the whole split).
    max_batches: int | None = None
    # Weighted k-NN probe on a small labelled set (ImageFolder trees or MDS shards with jpeg + label).
    knn_train: str | None = None
    knn_val: str | None = None
    knn_every_steps: int | None = None
    knn_k: int = _at_least(20, 1)
    knn_temperature: float = 0.07
    knn_batch_size: int = _at_least(64, 1)
    # Probes on frozen features (dune_scale.eval.registry: each entry a mapping with ``kind`` and its
    # settings, e.g. {kind: linear-seg, data: /data/ade20k_small}): at the end of training, and every
    # probe_every_steps steps when that is set.
    probes: list[dict[str, Any]] = field(default_factory=list)
    probe_every_steps: int | None = None


# The sections a ``students:`` entry may set; the rest (data, teachers, train, strategy, ...) is the
# run's: one teacher pass, one batch, one strategy for every student.
STUDENT_SECTIONS = ("student", "projector", "distill", "loss", "optim")
# Settings of the one teacher pass that every student shares, which a ``students:`` entry may not
# change: the teachers' standardisation (computed once per step) and the token grid the teachers
# are fed (each teacher's input is resized to the student's patch grid).
SHARED_STUDENT_KEYS = {"distill": ("norm_eps", "norm_momentum_start", "norm_momentum_end"), "student": ("patch_size",)}
STUDENTS_FOLDER = "students"
# The student settings a named architecture fixes and arch=custom needs.
ARCH_SHAPE_KEYS = ("embed_dim", "depth", "num_heads")


@dataclass
class StudentEntry:
    """One of several students trained on one teacher pass. A section left out inherits the
    top-level one; a section given is merged over it key by key (``student: {arch: vit_small}``)."""

    name: str = ""
    student: dict[str, Any] = field(default_factory=dict)
    projector: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Several students from one teacher pass (empty: the one student the sections above describe).
    students: list[StudentEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def global_batch_size(self, world_size: int) -> int:
        return self.train.batch_size_per_rank * self.train.grad_accum_steps * world_size

    def total_steps(self, world_size: int) -> int:
        """Length of the schedules: the recipe's epochs unless ``train.total_steps`` says otherwise.
        As main_dune.py counts: ceil(epochs · epoch_size / global batch), rounded up to even."""
        if self.train.total_steps is not None:
            return self.train.total_steps
        steps = math.ceil(self.train.epochs * self.train.epoch_size / self.global_batch_size(world_size))
        return steps + steps % 2

    def peak_lr(self, world_size: int) -> float:
        return self.optim.base_lr * self.global_batch_size(world_size) / self.optim.lr_reference_batch


def resolve_student_dicts(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, the configuration that student trains under) for each entry of a resolved config's
    ``students`` list, as plain dicts; ``[("", raw)]`` without the list. Reads saved configs too."""
    entries = raw.get("students") or []
    if not entries:
        return [("", raw)]
    shared = {key: value for key, value in raw.items() if key != "students"}
    resolved = []
    for entry in entries:
        resolved.append((entry["name"], merge_layer(shared, {s: entry[s] for s in STUDENT_SECTIONS if entry.get(s)})))
    return resolved


def student_configs(config: Config) -> list[tuple[str, Config]]:
    """(name, configuration) of every student the run trains: ``[("", config)]`` for a config without
    ``students:``, else each entry's sections merged over the top level (validated at load)."""
    if not config.students:
        return [("", config)]
    return [(name, _build(Config, raw, "")) for name, raw in resolve_student_dicts(config.to_dict())]


def student_subdir(name: str) -> str:
    """Where a student's outputs go, inside the run folder and inside each checkpoint folder: the
    folder itself for the one student of a config without ``students:``, else ``students/<name>``."""
    return f"{STUDENTS_FOLDER}/{name}" if name else ""


# ---------------------------------------------------------------------------------------------
# Loading: YAML → nested dict → typed dataclasses


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Recipe file (optional; a shipped recipe may be named without a path, e.g. ``vitb14_448``) +
    ``key=value`` overrides → validated :class:`Config`."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_recipe(Path(path) if Path(path).exists() or "/" in str(path) else recipe_path(str(path)))
    parsed = [_parse_override(item) for item in overrides]
    for key, value in parsed:
        if key == "student.arch":
            raw = _without_custom_shape(raw, value)
    for key, value in parsed:
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
    places = [path.parent / str(base), _shipped_recipes() / str(base)]
    found = next((place for place in places if place.is_file()), None)
    if found is None:
        raise ConfigError(f"config file {path}: its base {base!r} is neither at {places[0]} nor a shipped recipe ({places[1]})")
    return merge_layer(_read_recipe(found, seen + (path,)), data)


def merge_layer(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """``upper`` merged over ``lower`` (:func:`deep_merge`); a student section of ``upper`` naming
    an architecture takes the custom shape of ``lower``'s away (see the module docstring)."""
    student = upper.get("student")
    return deep_merge(_without_custom_shape(lower, student.get("arch") if isinstance(student, dict) else None), upper)


def _without_custom_shape(raw: dict[str, Any], arch: Any) -> dict[str, Any]:
    """``raw`` without student.embed_dim/depth/num_heads when ``arch`` names an architecture (it fixes them)."""
    student = raw.get("student")
    if arch in (None, "custom") or not isinstance(student, dict):
        return raw
    return {**raw, "student": {k: v for k, v in student.items() if k not in ARCH_SHAPE_KEYS}}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, nested mappings merged key by key (neither input is changed)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def recipe_path(name: str) -> Path:
    """The shipped recipe ``name`` (``configs/<name>.yaml``, package data of dune_scale)."""
    return _shipped_recipes() / f"{name}.yaml"


def _shipped_recipes() -> Path:
    return Path(str(importlib.resources.files("dune_scale") / "configs"))


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=100)")
    if re.fullmatch(r"\d+:\d+", text.strip()):
        return key.strip(), text.strip()  # a step range (run.profile_steps=10:20), not YAML's base-60 integer
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
    aliases = fld.metadata.get("aliases", {}) if fld is not None else {}
    for old, new in aliases.items():
        if type(value) is type(old) and value == old:
            value = new
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
            student = _build(Config, merged, "")
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
