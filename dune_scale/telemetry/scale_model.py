"""Scale model: what one training step costs beyond one GPU, predicted from first principles.

For a recipe and a GPU count it gives, per step and per GPU, the bytes each collective sends (the
student's strategy, the teachers' sharding scope, the teacher-norm statistics), their time on
stated links, how much of it hides behind compute, and the resulting img/s per GPU; also the data
bandwidth each node draws from object storage and the checkpoint's size and write time.

Parameter counts come from the project's model builders (``dune_scale.cli.scale_model`` builds
the recipe's models on the meta device); the compute term is a
measured single-GPU step (:class:`ComputeProfile`); everything else is an assumption named in
:class:`Links`, :class:`Storage` or the docstrings below.

Collectives follow the bandwidth-optimal ring (NCCL's "bus bandwidth" convention): over ``n``
ranks an all-gather or reduce-scatter of a full tensor of S bytes sends S·(n−1)/n per rank, an
all-reduce 2·S·(n−1)/n. A collective within one node runs at NVLink speed; one that spans nodes
is limited by each GPU's InfiniBand link (one NIC per GPU, rail-optimised).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

MB = 1e6
GB = 1e9
# fsdp: strategy.name=fsdp as shipped (fp32 parameters gathered); fsdp_bf16: strategy.fsdp_param_dtype=bf16;
# hsdp: strategy.fsdp_shard=node (sharded within each node, replicated across nodes).
STRATEGIES = ("fsdp", "fsdp_bf16", "hsdp", "zero1", "zero2", "zero3")
TEACHER_SCOPES = ("none", "world", "node")


@dataclass(frozen=True)
class Links:
    """Interconnect assumptions. Spec-sheet rates; ``efficiency`` is the fraction NCCL reaches."""

    nvlink_gbytes_per_s: float = 900.0  # H100/H200 NVLink 4, both directions together
    ib_gbits_per_s: float = 400.0  # InfiniBand per GPU (NDR 400; HDR 200)
    efficiency: float = 0.8
    gpus_per_node: int = 8
    # Latency of one step of a collective algorithm (one ring hop, one tree level).
    ib_hop_latency_us: float = 5.0
    nvlink_hop_latency_us: float = 1.0
    host_hop_latency_us: float = 50.0  # TCP between hosts (gloo): the per-step stop flag

    def bus_bandwidth(self, spans_nodes: bool) -> float:
        """Bytes/s one rank sends in a collective: one direction of NVLink, or the IB link."""
        raw = self.ib_gbits_per_s / 8 * GB if spans_nodes else self.nvlink_gbytes_per_s / 2 * GB
        return raw * self.efficiency

    def hop_seconds(self, spans_nodes: bool, algorithm: str) -> float:
        if algorithm == "host tree":
            return self.host_hop_latency_us * 1e-6
        return (self.ib_hop_latency_us if spans_nodes else self.nvlink_hop_latency_us) * 1e-6


@dataclass(frozen=True)
class Storage:
    """Data and checkpoint storage assumptions."""

    mean_jpeg_bytes: float = 110e3  # ≈ an ImageNet-1k train JPEG; the 19-dataset mixture is not measured
    write_bytes_per_s_per_node: float = 2 * GB  # to the shared checkpoint filesystem
    filesystem_bytes_per_s: float = 40 * GB  # the filesystem's aggregate write limit


@dataclass(frozen=True)
class ComputeProfile:
    """One GPU's measured step: /work/shared/perf/README.md, NVIDIA H200, vitb14_448, batch 64,
    bf16, eager, dune_scale ``launch/bench.py`` (2026-11-28)."""

    batch_per_gpu: int = 64
    step_ms: float = 661.0
    teacher_forward_ms: float = 469.0
    student_forward_ms: float = 59.0
    backward_ms: float = 128.0

    def faster(self, speedup: float) -> ComputeProfile:
        """The same step with every phase ``speedup``× faster (e.g. at a throughput target)."""
        return ComputeProfile(self.batch_per_gpu, self.step_ms / speedup, self.teacher_forward_ms / speedup,
                              self.student_forward_ms / speedup, self.backward_ms / speedup)

    def phase_ms(self, phase: str) -> float:
        return {"teacher forward": self.teacher_forward_ms, "student forward": self.student_forward_ms,
                "backward": self.backward_ms}[phase]


@dataclass(frozen=True)
class ModelSizes:
    """What the collectives move, counted from the models the recipe builds."""

    student_params: int
    student_blocks: int  # FSDP units: encoder blocks + projector blocks
    teacher_params: int  # all teachers together
    teacher_blocks: int
    norm_features: tuple[int, ...]  # feature width of every (teacher, token type) statistic


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_model_sizes(student: nn.Module, teachers: Mapping[str, nn.Module], tokens: Mapping[str, Sequence[str]]) -> ModelSizes:
    """Count a built student (encoder + projectors) and its teachers (meta-device modules will do);
    ``tokens``: the token types distilled from each teacher."""
    return ModelSizes(
        student_params=_numel(student),
        student_blocks=len(student.encoder.blocks) + sum(len(p.blocks) for p in student.projectors.values()),
        teacher_params=sum(_numel(t) for t in teachers.values()),
        teacher_blocks=sum(len(t.blocks) for t in teachers.values()),
        norm_features=tuple(int(teachers[name].embed_dim) for name in teachers for _ in tokens[name]),
    )


def gather_factor(ranks: int) -> float:
    """Share of a full tensor each rank sends in a ring all-gather or reduce-scatter."""
    return (ranks - 1) / ranks


@dataclass(frozen=True)
class Collective:
    """One kind of per-step traffic: bytes each rank sends, over which links, the compute phase it
    can hide behind (``hidden_by``, None: it blocks), issued as ``pieces`` collectives (one per
    FSDP unit: the first or last of a prefetched sequence never hides). Each piece pays a latency
    per algorithm step: ranks−1 ring hops (large tensors), or 2·log2(ranks) tree levels (small
    all-reduces; "host tree": over TCP)."""

    name: str
    bytes_per_rank: float
    ranks: int
    spans_nodes: bool
    hidden_by: str | None
    pieces: int = 1
    algorithm: str = "ring"

    def seconds(self, links: Links) -> float:
        if self.ranks <= 1:
            return 0.0
        steps = self.ranks - 1 if self.algorithm == "ring" else 2 * math.ceil(math.log2(self.ranks))
        latency = self.pieces * steps * links.hop_seconds(self.spans_nodes, self.algorithm)
        return self.bytes_per_rank / links.bus_bandwidth(self.spans_nodes) + latency


def student_collectives(strategy: str, sizes: ModelSizes, gpus: int, links: Links) -> list[Collective]:
    """The student's per-step traffic (no gradient accumulation).

    fsdp: FSDP2 as shipped, fp32 parameters (bf16 from autocast) all-gathered in forward and again
      in backward (reshard_after_forward), fp32 gradients reduce-scattered; prefetching hides the
      gathers behind the blocks' compute and the reduce-scatter behind backward.
    fsdp_bf16: the same with bf16 parameter gathers (``strategy.fsdp_param_dtype=bf16``).
    hsdp: FSDP2 sharded within each node: fp32 gathers and the reduce-scatter stay on NVLink; each
      rank's 1/node gradient shard is then all-reduced across nodes (ring: twice its bytes).
    zero1/zero2: DeepSpeed keeps fp32 parameters under torch autocast: fp32 gradients
      reduce-scattered, the updated fp32 parameter shards all-gathered after the step. ZeRO-1's
      reduction runs in step() (trainer-owned accumulation): nothing hides it; ZeRO-2 overlaps it
      with backward (overlap_comm). The parameter all-gather after the step never hides.
    zero3: fp32 parameters all-gathered in forward and backward, fp32 gradients reduce-scattered.
    """
    p, n, spans = sizes.student_params, gpus, gpus > links.gpus_per_node
    f, units = gather_factor(n), sizes.student_blocks
    fwd, bwd = "student forward", "backward"
    if strategy in ("fsdp", "fsdp_bf16"):
        gathered = 2 * p if strategy == "fsdp_bf16" else 4 * p
        return [
            Collective("student params all-gather (fwd)", gathered * f, n, spans, fwd, units),
            Collective("student params all-gather (bwd)", gathered * f, n, spans, bwd, units),
            Collective("student grads reduce-scatter", 4 * p * f, n, spans, bwd, units),
        ]
    if strategy == "hsdp":
        g = min(n, links.gpus_per_node)
        nodes = max(1, n // g)
        return [
            Collective("student params all-gather (fwd, node)", 4 * p * gather_factor(g), g, False, fwd, units),
            Collective("student params all-gather (bwd, node)", 4 * p * gather_factor(g), g, False, bwd, units),
            Collective("student grads reduce-scatter (node)", 4 * p * gather_factor(g), g, False, bwd, units),
            Collective("student grads all-reduce (across nodes)", 2 * 4 * p / g * gather_factor(nodes), nodes, True, bwd, units),
        ]
    if strategy in ("zero1", "zero2"):
        hidden = bwd if strategy == "zero2" else None
        return [
            Collective("student grads reduce-scatter", 4 * p * f, n, spans, hidden, units),
            Collective("student params all-gather (after step)", 4 * p * f, n, spans, None),
        ]
    if strategy == "zero3":
        return [
            Collective("student params all-gather (fwd)", 4 * p * f, n, spans, fwd, units),
            Collective("student params all-gather (bwd)", 4 * p * f, n, spans, bwd, units),
            Collective("student grads reduce-scatter", 4 * p * f, n, spans, bwd, units),
        ]
    raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


def teacher_collectives(scope: str, sizes: ModelSizes, gpus: int, links: Links, bytes_per_param: int = 2) -> list[Collective]:
    """Frozen teachers (``teachers.shard``; bf16 on GPUs): every forward all-gathers each block's
    weights over the sharding group, prefetched behind the previous block's forward. ``world``
    shards over all GPUs (inter-node links once there are several nodes), ``node`` within each node."""
    if scope == "none":
        return []
    group = gpus if scope == "world" else min(gpus, links.gpus_per_node)
    spans = group > links.gpus_per_node
    volume = bytes_per_param * sizes.teacher_params * gather_factor(group)
    return [Collective(f"teacher weights all-gather ({scope})", volume, group, spans, "teacher forward", sizes.teacher_blocks)]


def norm_statistics_collective(sizes: ModelSizes, gpus: int, links: Links) -> Collective:
    """Teacher-norm statistics: per (teacher, token type) three fp64 all-reduces in sequence (count,
    mean, centred second moment), between the teachers' and the students' forward: never hidden."""
    payload = sum(8 + 8 * d + 8 * d for d in sizes.norm_features)
    return Collective("teacher-norm statistics all-reduce", 2 * payload * gather_factor(gpus), gpus,
                      gpus > links.gpus_per_node, None, pieces=3 * len(sizes.norm_features), algorithm="tree")


def stop_flag_collective(gpus: int, links: Links) -> Collective:
    """The preemption check: one 4-byte all-reduce per step on the host (gloo, TCP), never hidden."""
    return Collective("stop-signal flag all-reduce (gloo)", 4.0, gpus, gpus > links.gpus_per_node, None, algorithm="host tree")


def exposed_ms(collectives: list[Collective], links: Links, compute: ComputeProfile) -> float:
    """Communication time the step waits for. Collectives hidden by the same phase share its
    window (they share the links): what exceeds the window shows, plus each one's unhideable
    first/last piece; blocking ones show in full."""
    exposed, windows = 0.0, {}
    for c in collectives:
        ms = c.seconds(links) * 1e3
        if c.hidden_by is None:
            exposed += ms
        else:
            windows[c.hidden_by] = windows.get(c.hidden_by, 0.0) + ms
            exposed += ms / c.pieces
    return exposed + sum(max(0.0, ms - compute.phase_ms(phase)) for phase, ms in windows.items())


@dataclass
class StepPrediction:
    strategy: str
    teacher_scope: str
    gpus: int
    collectives: list[Collective] = field(default_factory=list)
    exposed_ms: float = 0.0
    step_ms: float = 0.0
    img_per_s_per_gpu: float = 0.0


def predict_step(
    strategy: str, scope: str, sizes: ModelSizes, gpus: int, links: Links, compute: ComputeProfile
) -> StepPrediction:
    """Step time = measured single-GPU compute + the communication that does not hide behind it."""
    collectives = [
        *student_collectives(strategy, sizes, gpus, links),
        *teacher_collectives(scope, sizes, gpus, links),
        norm_statistics_collective(sizes, gpus, links),
        stop_flag_collective(gpus, links),
    ]
    exposed = exposed_ms(collectives, links, compute)
    step = compute.step_ms + exposed
    return StepPrediction(strategy, scope, gpus, collectives, exposed, step, compute.batch_per_gpu / step * 1e3)


def data_bytes_per_s_per_node(img_per_s_per_gpu: float, links: Links, storage: Storage) -> float:
    """Every sample is read once per epoch by the node that trains on it (Streaming partitions the
    epoch by node), so a node downloads its own images' bytes, plus nothing else."""
    return img_per_s_per_gpu * links.gpus_per_node * storage.mean_jpeg_bytes


def checkpoint_bytes(strategy: str, sizes: ModelSizes) -> tuple[float, float]:
    """(total bytes, bytes of the largest single writer). fp32 weights and AdamW's two fp32
    moments (12 bytes per parameter; teacher-norm buffers and RNG/loader state are negligible).
    FSDP (DCP) and ZeRO-3 write every piece from its owner; ZeRO-1/2 also write the full fp32
    weights from rank 0 (DeepSpeed's model file), the optimizer state from each owner."""
    total = 12.0 * sizes.student_params
    # HSDP writes one replica's shards (the first node's), like FSDP at that node's size.
    largest = 4.0 * sizes.student_params if strategy in ("zero1", "zero2") else 0.0
    return total, largest


def checkpoint_seconds(strategy: str, sizes: ModelSizes, gpus: int, links: Links, storage: Storage) -> float:
    total, largest = checkpoint_bytes(strategy, sizes)
    nodes = max(1, gpus // links.gpus_per_node)
    aggregate = min(nodes * storage.write_bytes_per_s_per_node, storage.filesystem_bytes_per_s)
    return max(total / aggregate, largest / storage.write_bytes_per_s_per_node)
