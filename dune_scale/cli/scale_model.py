"""``launch/scale_model.py``: the scale model of ``dune_scale.telemetry.scale_model`` as markdown
tables for BENCHMARKS.md: per-step traffic per GPU, its time, predicted img/s per GPU, data
bandwidth per node and checkpoint cost, at several GPU counts and InfiniBand speeds."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from dune_scale.cli.common import run_program
from dune_scale.config import Config, load_config
from dune_scale.engine.compose import build_student
from dune_scale.teachers import build_teacher, get_teacher_spec
from dune_scale.telemetry.scale_model import (
    GB,
    MB,
    STRATEGIES,
    TEACHER_SCOPES,
    ComputeProfile,
    Links,
    ModelSizes,
    Storage,
    checkpoint_bytes,
    checkpoint_seconds,
    count_model_sizes,
    data_bytes_per_s_per_node,
    predict_step,
)


def model_sizes(cfg: Config) -> ModelSizes:
    """The recipe's student and teachers, built on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        teachers = {t.name: build_teacher(t.name, None, **t.arch) for t in cfg.teachers.models}
        tokens = {t.name: tuple(t.tokens) or get_teacher_spec(t.name).tokens for t in cfg.teachers.models}
        student = build_student(cfg, {name: int(t.embed_dim) for name, t in teachers.items()}, tokens)
    return count_model_sizes(student, teachers, tokens)


def traffic_table(sizes: ModelSizes, gpus: list[int], ib: list[float], compute: ComputeProfile) -> list[str]:
    """Bytes each GPU sends per step, and their time at each IB speed, per kind of traffic."""
    links = [Links(ib_gbits_per_s=speed) for speed in ib]
    heads = [f"{g} GPUs: MB · ms@{'/'.join(f'{s:g}' for s in ib)} Gb/s" for g in gpus]
    lines = ["| traffic per GPU per step | " + " | ".join(heads) + " |", "|---" + "|---:" * len(gpus) + "|"]
    rows: dict[str, list[str]] = {}
    for strategy in STRATEGIES:
        for scope in TEACHER_SCOPES:
            for g in gpus:
                for c in predict_step(strategy, scope, sizes, g, links[0], compute).collectives:
                    label = f"{strategy}: {c.name}" if c.name.startswith("student") else c.name
                    times = "/".join(f"{c.seconds(link) * 1e3:.2f}" for link in links)
                    cells = rows.setdefault(label, [""] * len(gpus))
                    cells[gpus.index(g)] = f"{c.bytes_per_rank / MB:,.2f} · {times}" if c.ranks > 1 else "–"
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows.items()]
    return lines


def throughput_table(sizes: ModelSizes, gpus: list[int], ib: list[float], compute: ComputeProfile) -> list[str]:
    columns = [(g, speed) for g in gpus for speed in ib]
    lines = ["| student strategy | teachers.shard | " + " | ".join(f"{g} GPUs @{s:g} Gb/s" for g, s in columns) + " |",
             "|---|---" + "|---:" * len(columns) + "|"]
    for strategy in STRATEGIES:
        for scope in TEACHER_SCOPES:
            cells = []
            for g, speed in columns:
                p = predict_step(strategy, scope, sizes, g, Links(ib_gbits_per_s=speed), compute)
                cells.append(f"{p.img_per_s_per_gpu:.1f} (+{p.exposed_ms:.1f} ms)")
            lines.append(f"| {strategy} | {scope} | " + " | ".join(cells) + " |")
    return lines


def storage_table(sizes: ModelSizes, gpus: list[int], compute: ComputeProfile, storage: Storage, every_steps: int) -> list[str]:
    links = Links()
    lines = ["| GPUs | data per node at the predicted fsdp img/s | checkpoint size | write s (fsdp / zero1-2 / zero3) | per step, amortised over checkpoint.every_steps |",
             "|---:|---:|---:|---:|---:|"]
    for g in gpus:
        rate = predict_step("fsdp", "none", sizes, g, links, compute).img_per_s_per_gpu
        data = data_bytes_per_s_per_node(rate, links, storage)
        size = checkpoint_bytes("fsdp", sizes)[0]
        secs = [checkpoint_seconds(s, sizes, g, links, storage) for s in ("fsdp", "zero2", "zero3")]
        lines.append(f"| {g} | {data / MB:,.0f} MB/s ({data * 8 / GB:.2f} Gb/s) | {size / GB:.2f} GB | "
                     + " / ".join(f"{s:.2f}" for s in secs) + f" | {max(secs) / every_steps * 1e3:.2f} ms |")
    return lines


def report(config: str, overrides: list[str], gpus: list[int], ib: list[float], storage: Storage, speedup: float) -> str:
    cfg = load_config(config, overrides)
    sizes, compute = model_sizes(cfg), ComputeProfile().faster(speedup)
    links = Links()
    out = [
        f"Recipe `{config}`: student {sizes.student_params / 1e6:.1f} M parameters ({sizes.student_blocks} FSDP blocks), "
        f"teachers {sizes.teacher_params / 1e6:.1f} M ({sizes.teacher_blocks} blocks; {2 * sizes.teacher_params / GB:.2f} GB in bf16), "
        f"teacher-norm statistics over {len(sizes.norm_features)} (teacher, token) pairs.",
        f"Compute (measured single-GPU step{f' made {speedup:g}x faster' if speedup != 1 else ''}): {dataclasses.asdict(compute)}.",
        f"Links: {dataclasses.asdict(links)} (IB speed per column). Storage: {dataclasses.asdict(storage)}.",
        "",
        *traffic_table(sizes, gpus, ib, compute),
        "",
        "Predicted img/s per GPU (in brackets: communication the step waits for):",
        "",
        *throughput_table(sizes, gpus, ib, compute),
        "",
        *storage_table(sizes, gpus, compute, storage, cfg.checkpoint.every_steps),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DUNE scale model: per-step communication and predicted img/s per GPU")
    parser.add_argument("--config", default="vitb14_448", help="recipe whose models are counted (default: vitb14_448, the measured one)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512], help="GPU counts (8 per node)")
    parser.add_argument("--ib-gbits", type=float, nargs="+", default=[200.0, 400.0], help="InfiniBand Gb/s per GPU")
    parser.add_argument("--mean-jpeg-kb", type=float, default=Storage.mean_jpeg_bytes / 1e3, help="mean stored image size")
    parser.add_argument("--speedup", type=float, default=1.0, help="model a compute step this many times faster than measured")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    args = parser.parse_args(argv)

    def program() -> int:
        # The models are only counted: a stage-2 recipe's pretrained student is never read.
        print(report(args.config, ["student.pretrained=not-read", *args.overrides], args.gpus, args.ib_gbits,
                     Storage(mean_jpeg_bytes=args.mean_jpeg_kb * 1e3), args.speedup))
        return 0

    return run_program(program)
