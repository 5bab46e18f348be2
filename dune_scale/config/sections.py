"""The configuration's sections: one typed dataclass per concern (``run``, ``student``, ``data`` …),
each field with its default and, where it has one, its rule (choices, minimum, pattern) as metadata
that :mod:`dune_scale.config.validation` enforces. :class:`Config` holds them all and derives the
numbers several parts need from more than one section (global batch, schedule length, peak lr)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Union

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


def student_subdir(name: str) -> str:
    """Where a student's outputs go, inside the run folder and inside each checkpoint folder: the
    folder itself for the one student of a config without ``students:``, else ``students/<name>``."""
    return f"{STUDENTS_FOLDER}/{name}" if name else ""


def _plain(value: Any) -> Any:
    """Tuples → lists so the resolved config is plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
