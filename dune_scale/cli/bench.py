"""Throughput benchmark of the training step: images/s, MFU, where the time goes, peak memory.

What is measured is ``Trainer.train_step`` itself, on a trainer that ``build_trainer`` assembles
exactly as training does (teachers, student, strategy, objective), so a number here is a number
of training. Inputs are synthetic batches made once on the device (no I/O: the step alone) or, with
``--data``, the real training loader.

Timing. Warm-up steps (compilation, allocator growth, autotuning) run first and are discarded.
Inside the measured steps nothing waits for the device beyond what training itself does: step
boundaries and the trainer's phases (data, teacher_forward with one detail per teacher,
student_forward, loss, backward, optimizer) are CUDA events, read once after the last step (on
CPU, where work is synchronous, the wall clock). Phases are the device time between a phase's
start and end, so a host stall (e.g. waiting for the loader) shows up in the phase during which
the device sat idle. Communication is
not a phase of its own: FSDP/ZeRO collectives overlap backward and the optimizer step and are
counted there.

Across ranks: a step takes as long as its slowest rank; images/s per rank is the global rate
divided by the number of ranks; phases are averaged over ranks; peak memory is listed per rank.

MFU = achieved model FLOP/s per device (``flops.dune_step_flops``) ÷ the device's dense bf16 peak
(spec sheet, matched by device name; ``--peak-tflops`` overrides, e.g. with a measured matmul peak).

``--reference`` also times the seed-style step (``reference_step``) for the base configuration's
shapes in the same process, on the same device, and gives every variant its img/s per rank ÷ the
reference's img/s: the ratio is what the project publishes, a time alone is not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dune_scale import distributed
from dune_scale.config import Config, ConfigError, EvalConfig, load_config
from dune_scale.distributed import DistInfo, rank_seed
from dune_scale.engine.compose import RunPlan, build_trainer, check_run, reference_work, train_loader
from dune_scale.telemetry.flops import StepFlops, dune_step_flops
from dune_scale.telemetry.phases import PhaseTimer
from dune_scale.telemetry.reference_step import (
    REFERENCE_VARIANTS,
    ReferenceResult,
    ReferenceUnavailable,
    measure_reference,
    ratios,
    reference_images,
    require_timm,
)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' spec sheets, matched as a
# case-insensitive substring of torch.cuda.get_device_name(); the first match wins, so a name that
# contains another (H100 PCIe ⊃ H100, L40S ⊃ L40 ⊃ L4, A100 ⊃ A10) comes first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("H100 80GB HBM3")
    ("H200", 989.0),  # also GH200
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)

SYNTHETIC_POOL = 2  # distinct synthetic batches cycled through (so no step sees the previous input)


@dataclass(frozen=True)
class BenchOptions:
    steps: int = 20
    warmup: int = 5
    real_data: bool = False
    random_init: bool = False
    peak_tflops: float | None = None
    reference: tuple[str, ...] = ()  # seed-style reference variants to run alongside (none: no reference)


@dataclass
class VariantResult:
    """One configuration's numbers (the JSON ``results`` entries; BENCHMARKS.md lists the fields)."""

    name: str
    overrides: list[str]
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None
    world_size: int = 1
    batch_size_per_rank: int = 0
    grad_accum_steps: int = 1
    global_batch_size: int = 0
    image_size: int = 0
    steps: int = 0
    warmup_steps: int = 0
    step_time_s: float | None = None  # mean over measured steps
    step_time_median_s: float | None = None
    step_time_min_s: float | None = None
    step_time_max_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    img_per_s_per_rank: float | None = None
    img_per_s_global: float | None = None
    flops_per_image: dict[str, float] | None = None
    achieved_tflops_per_rank: float | None = None
    peak_tflops: float | None = None
    mfu: float | None = None
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # name → seconds per step, percent
    peak_memory_gib: list[float] = field(default_factory=list)  # per rank
    final_loss: float | None = None
    ratio_to_reference: dict[str, float] = field(default_factory=dict)  # reference variant → this img/s ÷ its img/s
    # Several students on one teacher pass: per student (see ``_per_student``); the img/s above are
    # the images every student trained on per second.
    students: dict[str, dict[str, float]] = field(default_factory=dict)
    wall_s: float = 0.0  # this row's wall time: building, compiling, warm-up and measured steps


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def table_peak_tflops(name: str) -> float | None:
    """The spec-sheet dense bf16 peak of a known GPU name, None for others (and CPUs)."""
    lowered = name.lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in lowered), None)


def random_init_overrides(cfg: Config) -> list[str]:
    """Overrides that start every teacher and the student from random weights: speed does not
    depend on the weights, and the full-size recipes otherwise need checkpoints on disk. A stage-2
    recipe is benchmarked as stage 1 (the stage only says where the student's weights come from)."""
    overrides = ["student.pretrained=null", "train.stage=1"]
    for i in range(len(cfg.teachers.models)):
        overrides += [f"teachers.models.{i}.checkpoint=null", f"teachers.models.{i}.random_init=true"]
    return overrides


def without_evaluation(cfg: Config) -> Config:
    """``cfg`` with every ``eval`` setting off: the benchmark times training steps, and validation,
    the k-NN probe and feature pictures are not part of one (nor is their data connected here)."""
    return dataclasses.replace(cfg, eval=EvalConfig())


def synthetic_batches(cfg: Config, plan: RunPlan, device: torch.device, rank: int) -> list[dict[str, Any]]:
    """Per-rank batches made once on the device, shaped as the loader's (ImageNet-normalised images
    ≈ N(0, 1)). Dataset names fill each batch in the plan's mixture shares (largest remainder), so a
    batch is teacher-balanced as the loader makes it and domain-based teacher dropping sees real
    domains."""
    size, batch, mixture = cfg.train.image_size, plan.batch_size_per_rank, plan.mixture
    quotas = [s.proportion * batch for s in mixture.streams]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: counts[i] - quotas[i])
    for i in by_remainder[: batch - sum(counts)]:
        counts[i] += 1
    names = [s.name for s, n in zip(mixture.streams, counts) for _ in range(n)]
    generator = torch.Generator(device=device)
    generator.manual_seed(rank_seed(cfg.run.seed, rank))
    return [
        {
            "images": torch.randn(batch, 3, size, size, generator=generator, device=device),
            "dataset": names,
            "index": torch.arange(i * batch, (i + 1) * batch),
        }
        for i in range(SYNTHETIC_POOL)
    ]


class StepClock:
    """Step boundaries as CUDA events read after the last step (no sync in between), or the wall
    clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self._marks, self._marks[1:])]
        return [b - a for a, b in zip(self._marks, self._marks[1:])]


def _rank_rows(values: Sequence[float], dist: DistInfo) -> torch.Tensor:
    """world × len(values): every rank's values (zero-padded rows summed, so the plain all-reduce
    serves; works with gloo and nccl)."""
    rows = torch.zeros(dist.world_size, len(values), dtype=torch.float64, device=dist.device)
    rows[dist.rank] = torch.tensor(list(values), dtype=torch.float64)
    return distributed.all_reduce_sum(rows).cpu()


def _peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated since the variant began. CPU: the process's max RSS (a high-water mark
    over the whole process: later variants of one call report at least the earlier ones' peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(cfg: Config, options: BenchOptions, result: VariantResult, dist: DistInfo) -> None:
    """Build the trainer for ``cfg``, warm up, time ``options.steps`` steps; fill ``result``."""
    device = dist.device
    if device.type == "cuda":
        # The allocator's statistics exist only once CUDA is initialised; nothing has touched the
        # device yet in a fresh process ("Invalid device argument" otherwise).
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    plan = check_run(cfg, dist)
    result.batch_size_per_rank = plan.batch_size_per_rank
    loader = train_loader(cfg, plan) if options.real_data else synthetic_batches(cfg, plan, device, dist.rank)
    try:
        _time_steps(cfg, options, result, dist, plan, loader)
    finally:
        if options.real_data:
            from dune_scale.data import close_loader

            close_loader(loader)


def _time_steps(
    cfg: Config, options: BenchOptions, result: VariantResult, dist: DistInfo, plan: RunPlan, loader: Any
) -> None:
    """Warm up, time ``options.steps`` training steps on ``loader`` and fill ``result``."""
    device = dist.device
    phases = PhaseTimer(device)
    trainer = build_trainer(cfg, dist, plan, loader, phases)
    each = [dune_step_flops(s.strategy.module, trainer.teachers.teachers, cfg.train.image_size) for s in trainer.students]
    # One teacher pass for every student: the teachers' FLOPs once, each student's on top.
    flops = StepFlops(each[0].teachers_forward, sum(f.student_forward for f in each))
    batches: Iterator[dict[str, Any]] = trainer.batches()  # the loop training runs: endless, epoch after epoch
    for student in trainer.students:
        student.strategy.module.train()

    for _ in range(options.warmup):
        trainer.train_step(batches)
    phases.reset()  # drops the warm-up's phases (waits for the device once)
    clock = StepClock(device)
    clock.mark()
    for _ in range(options.steps):
        metrics = trainer.train_step(batches)
        clock.mark()
    local_steps = clock.intervals()
    phases.collect()
    final_loss = float(next(iter(metrics.values()))["loss"])

    step_times = _rank_rows(local_steps, dist).max(dim=0).values.tolist()  # the slowest rank sets the pace
    names = list(phases.totals)
    phase_seconds = _rank_rows([phases.totals[n] / options.steps for n in names], dist).mean(dim=0).tolist()
    memory = _rank_rows([_peak_memory_gib(device)], dist)[:, 0].tolist()

    mean_step = statistics.fmean(step_times)
    global_rate = result.global_batch_size / mean_step
    per_rank = global_rate / dist.world_size
    achieved = flops.total * per_rank / 1e12
    peak = options.peak_tflops if options.peak_tflops is not None else table_peak_tflops(device_name(device))
    breakdown = dict(zip(names, phase_seconds))
    # Host work between phases, launch gaps; a phase's details ("teacher_forward/<teacher>") are inside it.
    breakdown["other"] = mean_step - sum(s for n, s in breakdown.items() if not is_detail(n, breakdown))
    result.step_time_s = mean_step
    result.step_time_median_s = statistics.median(step_times)
    result.step_time_min_s = min(step_times)
    result.step_time_max_s = max(step_times)
    result.step_times_s = step_times
    result.img_per_s_global = global_rate
    result.img_per_s_per_rank = per_rank
    result.flops_per_image = {
        "total": flops.total,
        "teachers_forward": flops.teachers_forward,
        "student_forward": flops.student_forward,
        "teachers_share": flops.teachers_share,
    }
    result.achieved_tflops_per_rank = achieved
    result.peak_tflops = peak
    result.mfu = achieved / peak if peak else None
    result.phases = {n: {"seconds": s, "percent": 100.0 * s / mean_step} for n, s in breakdown.items()}
    result.peak_memory_gib = memory
    result.final_loss = final_loss
    if len(trainer.students) > 1:
        result.students = _per_student(trainer, breakdown, mean_step, result.global_batch_size / dist.world_size, metrics)


def is_detail(phase: str, phases: Iterable[str]) -> bool:
    """``parent/part`` of a phase ``parent`` that is timed too: time already counted in the parent."""
    return "/" in phase and phase.rsplit("/", 1)[0] in phases


def _per_student(
    trainer: Any, breakdown: dict[str, float], mean_step: float, images_per_rank: int, metrics: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Each student of a shared teacher pass: its own seconds per step (its phases), the step it
    would take alone (the shared part — data, teachers, statistics, host — plus its own) and the
    img/s per rank that gives; against the combined step, the saving of sharing the teachers. Host
    time between phases ("other") counts as shared, so the alone estimates are upper bounds (run the
    student alone, ``students: [that one]``, for its measured rate)."""
    own = {s.name: sum(t for phase, t in breakdown.items() if phase.startswith(f"{s.subdir}/")) for s in trainer.students}
    shared = mean_step - sum(own.values())
    return {
        name: {
            "own_seconds": seconds,
            "alone_step_time_s": shared + seconds,
            "img_per_s_per_rank_alone": images_per_rank / (shared + seconds),
            "final_loss": float(metrics[name]["loss"]),
        }
        for name, seconds in own.items()
    }


def run_variant(
    config_path: str,
    base_overrides: Sequence[str],
    variant: Sequence[str],
    options: BenchOptions,
    name: str,
    dist: DistInfo,
) -> VariantResult:
    """One row of the comparison: a failure (bad override, unsupported here, out of memory) becomes
    a failed result with its message, and the next variant still runs."""
    result = VariantResult(name=name, overrides=list(variant), world_size=dist.world_size)
    started = time.perf_counter()
    try:
        overrides = [*base_overrides, *variant]
        cfg = load_config(config_path, overrides)
        if options.random_init:
            cfg = load_config(config_path, [*overrides, *random_init_overrides(cfg)])
        cfg = without_evaluation(cfg)
        result.grad_accum_steps = cfg.train.grad_accum_steps
        result.global_batch_size = cfg.global_batch_size(dist.world_size)
        result.image_size = cfg.train.image_size
        result.steps, result.warmup_steps = options.steps, options.warmup
        measure(cfg, options, result, dist)
    except Exception as err:  # noqa: BLE001 - any failure is this variant's result
        result.status, result.error = "failed", f"{type(err).__name__}: {err}"
    finally:
        _release_memory(dist.device)
        result.wall_s = time.perf_counter() - started
    return result


def _release_memory(device: torch.device) -> None:
    """Free what a variant held (modules, optimizer state, compiled graphs) before the next one."""
    gc.collect()
    if "torch._dynamo" in sys.modules:  # only a compiled variant loaded it; importing it is slow
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_reference(
    config_path: str, base_overrides: Sequence[str], options: BenchOptions, device: torch.device
) -> dict[str, Any]:
    """The seed-style step for the base configuration's shapes, each reference variant in turn (a
    failing one is reported and the next runs)."""
    work = reference_work(load_config(config_path, list(base_overrides)))
    images = reference_images(work, device)
    results = []
    for variant in options.reference:
        result = ReferenceResult(variant)
        try:
            measure_reference(work, variant, images, options.steps, options.warmup, result)
        except Exception as err:  # noqa: BLE001 - any failure is this variant's result
            result.status, result.error = "failed", f"{type(err).__name__}: {err}"
        finally:
            _release_memory(device)
        results.append(result)
    del images
    return {"work": dataclasses.asdict(work), "results": [dataclasses.asdict(r) for r in results]}


def run_benchmark(
    config_path: str,
    base_overrides: Sequence[str],
    variants: Sequence[str],
    options: BenchOptions,
    dist: DistInfo,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The reference first if asked for, then the base configuration and each variant (a string of
    extra ``key=value`` overrides) in turn, on the process group ``dist`` describes; returns the JSON
    report. ``progress`` receives the report after each row, so a run cut short (a time limit, a
    hang in a later variant) keeps what it measured."""
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(dist.device),
        "world_size": dist.world_size,
        "torch": torch.__version__,
        "config": config_path,
        "overrides": list(base_overrides),
        "data": "loader" if options.real_data else "synthetic",
        "options": dataclasses.asdict(options),
        "results": [],
        "reference": None,
    }
    report_progress = progress or (lambda _: None)
    if options.reference:
        report["reference"] = run_reference(config_path, base_overrides, options, dist.device)
        report_progress(report)
    done = [ReferenceResult(**r) for r in (report["reference"] or {"results": []})["results"]]
    for name, extra in [("base", [])] + [(text, shlex.split(text)) for text in variants]:
        result = run_variant(config_path, base_overrides, extra, options, name, dist)
        if done:
            result.ratio_to_reference = ratios(result.img_per_s_per_rank, done)
        report["results"].append(dataclasses.asdict(result))
        report_progress(report)
    return report


# --------------------------------------------------------------------------------------------- output


def or_dash(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or a dash where there is none (tables of bench and gpu-check)."""
    return "—" if value is None else format(value, spec)


def render(report: dict[str, Any], console: Console) -> None:
    """A comparison table (one row per variant), the phase breakdown, and each failure's message."""
    results = report["results"]
    title = f"{report['config']} · {report['device']} × {report['world_size']} · {report['data']} data"
    table = Table(title=title)
    columns = ("variant", "img/s/rank", "img/s global", "step ms", "median ms", "TFLOP/s/rank", "MFU", "peak GiB", "loss")
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in results:
        if r["status"] != "ok":
            table.add_row(r["name"], "[red]failed[/red]", *[""] * (len(columns) - 2))
            continue
        table.add_row(
            r["name"],
            or_dash(r["img_per_s_per_rank"], ".1f"),
            or_dash(r["img_per_s_global"], ".1f"),
            or_dash(r["step_time_s"] * 1e3, ".1f"),
            or_dash(r["step_time_median_s"] * 1e3, ".1f"),
            or_dash(r["achieved_tflops_per_rank"], ".4g"),
            "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            or_dash(max(r["peak_memory_gib"]), ".2f"),
            or_dash(r["final_loss"], ".4f"),
        )
    console.print(table)

    ok = [r for r in results if r["status"] == "ok"]
    if ok:
        phases = Table(title="time per step by phase: ms (% of step)")
        phases.add_column("phase")
        for r in ok:
            phases.add_column(r["name"], justify="right")
        for name, label in _phase_rows(dict.fromkeys(p for r in ok for p in r["phases"])):
            cells = []
            for r in ok:
                p = r["phases"].get(name)
                cells.append("—" if p is None else f"{1e3 * p['seconds']:.1f} ({p['percent']:.0f}%)")
            phases.add_row(label, *cells)
        console.print(phases)
        flops = ok[0]["flops_per_image"]
        console.print(
            f"model FLOPs/image {flops['total'] / 1e9:.4g} GFLOP (teachers' forward {100 * flops['teachers_share']:.0f}%); "
            f"peak {or_dash(ok[0]['peak_tflops'], '.0f')} TFLOP/s bf16 dense; "
            f"{ok[0]['steps']} steps after {ok[0]['warmup_steps']} warm-up",
            highlight=False,
        )
    for r in ok:
        if r.get("students"):
            _render_students(r, console)
    if report.get("reference"):
        _render_reference(report["reference"], results, console)
    for r in results:
        if r["status"] != "ok":
            console.print(f"[red]{r['name']} failed:[/red] {r['error']}", highlight=False)
        elif r["step_time_max_s"] > 2 * r["step_time_median_s"]:
            console.print(
                f"[yellow]{r['name']}: uneven steps[/yellow] (median {1e3 * r['step_time_median_s']:.1f} ms, slowest "
                f"{1e3 * r['step_time_max_s']:.1f} ms): something else used the device or host, or warm-up was too short",
                highlight=False,
            )


def _phase_rows(names: Iterable[str]) -> list[tuple[str, str]]:
    """(phase, label) in display order: each phase followed by its details, indented."""
    names = list(names)
    rows = []
    for name in (n for n in names if not is_detail(n, names)):
        rows.append((name, name))
        rows += [(d, f"  {d.rsplit('/', 1)[1]}") for d in names if is_detail(d, names) and d.rsplit("/", 1)[0] == name]
    return rows


def _render_students(result: dict[str, Any], console: Console) -> None:
    """Per student of one teacher pass, and what sharing the teachers saves against separate runs."""
    table = Table(title=f"{result['name']}: students on one teacher pass")
    for column in ("student", "own ms", "alone ms (est.)", "img/s/rank alone (est.)", "loss"):
        table.add_column(column, justify="left" if column == "student" else "right")
    for name, s in result["students"].items():
        table.add_row(name, or_dash(1e3 * s["own_seconds"], ".1f"), or_dash(1e3 * s["alone_step_time_s"], ".1f"),
                      or_dash(s["img_per_s_per_rank_alone"], ".1f"), or_dash(s["final_loss"], ".4f"))
    console.print(table)
    separate = sum(s["alone_step_time_s"] for s in result["students"].values())
    console.print(
        f"combined {result['img_per_s_per_rank']:.1f} img/s/rank for all students; separate runs would take "
        f"{separate / result['step_time_s']:.2f}× the time", highlight=False,
    )


def _render_reference(reference: dict[str, Any], results: list[dict[str, Any]], console: Console) -> None:
    """The seed-style step's numbers, then each variant's ratio to each of them."""
    table = Table(title="seed-style reference step (same process, same device)")
    for column in ("reference", "img/s", "step ms", "teachers ms", "peak GiB"):
        table.add_column(column, justify="left" if column == "reference" else "right")
    for r in reference["results"]:
        if r["status"] != "ok":
            table.add_row(r["name"], "[red]failed[/red]", "", "", "")
            continue
        table.add_row(
            r["name"], or_dash(r["img_per_s"], ".1f"), or_dash(r["step_time_s"] * 1e3, ".1f"),
            or_dash(r["teacher_time_s"] * 1e3, ".1f"), or_dash(r["peak_memory_gib"], ".2f"),
        )
    console.print(table)
    names = [r["name"] for r in reference["results"] if r["status"] == "ok"]
    if names:
        ratio_table = Table(title="dune_scale img/s ÷ reference img/s")
        ratio_table.add_column("variant")
        for name in names:
            ratio_table.add_column(f"÷ {name}", justify="right")
        for r in results:
            ratio_table.add_row(r["name"], *(or_dash(r["ratio_to_reference"].get(n), ".3f") + "×" for n in names))
        console.print(ratio_table)
    for r in reference["results"]:
        if r["status"] != "ok":
            console.print(f"[red]reference {r['name']} failed:[/red] {r['error']}", highlight=False)


# --------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training-step throughput, MFU, phase breakdown and peak memory (python / torchrun / deepspeed)"
    )
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the base configuration (before --variants)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="discarded warm-up steps (default 5)")
    parser.add_argument("--data", action="store_true", help="real training loader instead of synthetic in-memory batches")
    parser.add_argument(
        "--random-init", "--random-teachers", dest="random_init", action="store_true",
        help="random-initialised teachers and student: no checkpoint is read (speed does not depend on weights)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table by device name)")
    parser.add_argument("--json", type=Path, default=None, help="report file (default: <run.output_dir>/bench.json)")
    parser.add_argument(
        "--variants", nargs="+", default=[], metavar="OVERRIDES",
        help='extra overrides per variant, one quoted string each, e.g. "train.compile=true" "loss.fused=false"',
    )
    parser.add_argument(
        "--reference", action="store_true",
        help="also time the seed-style reference step (needs timm) and report each variant's ratio to it",
    )
    parser.add_argument(
        "--reference-variants", default="seed,compiled", metavar="NAMES",
        help=f"comma-separated reference variants of {', '.join(REFERENCE_VARIANTS)} (default seed,compiled)",
    )
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    args.reference_variants = tuple(v.strip() for v in args.reference_variants.split(",") if v.strip())
    unknown = sorted(set(args.reference_variants) - set(REFERENCE_VARIANTS))
    if unknown or not args.reference_variants:
        parser.error(f"--reference-variants: {', '.join(unknown) or 'none given'}; choose from {', '.join(REFERENCE_VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """0 when every variant ran, 1 when one failed (the report still lists it), 2 on a bad base config."""
    args = parse_args(argv)
    try:
        base = without_evaluation(load_config(args.config, args.overrides))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.reference:
        try:
            require_timm()
        except ReferenceUnavailable as err:
            print(f"--reference: {err}", file=sys.stderr)
            return 2
    options = BenchOptions(
        steps=args.steps, warmup=args.warmup, real_data=args.data, random_init=args.random_init, peak_tflops=args.peak_tflops,
        reference=args.reference_variants if args.reference else (),
    )
    dist = distributed.init_distributed(base.run.device)
    try:
        check_run(base, dist)  # e.g. fp8 where the device cannot run it: exit 2 before any variant
    except ConfigError as err:
        distributed.shutdown()
        print(f"config error: {err}", file=sys.stderr)
        return 2
    path = args.json or Path(base.run.output_dir) / "bench.json"

    def write(report: dict[str, Any]) -> None:
        if dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")

    try:
        report = run_benchmark(args.config, args.overrides, args.variants, options, dist, write)
    finally:
        distributed.shutdown()
    if dist.is_main:
        console = Console(width=None if sys.stdout.isatty() else 160)
        render(report, console)
        console.print(f"report: {path}", highlight=False)
    return 0 if all(r["status"] == "ok" for r in report["results"]) else 1
