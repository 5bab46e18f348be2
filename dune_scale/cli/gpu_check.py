"""``make gpu-check``: the GPU acceptance run, one command, under 8 minutes on one GPU.

Three parts (``--parts`` picks some), each a subprocess with its own time limit; a part that
hangs or fails is reported and the next still runs:
``pytest -m gpu`` (kernels compiled for the card, compiled and FP8 teachers vs eager, a bf16
training run with resume; each finished test is kept even when the part is stopped),
``python launch/bench_loss.py``, and ``launch/bench.py --reference`` on
``configs/vitb14_448.yaml`` (random weights, synthetic batches: neither checkpoints, DeepSpeed nor
Streaming are needed; its JSON is rewritten after each row). Writes ``gpu_check.json``
(everything, the parts' own JSON included) and ``gpu_check.md`` (the tables for BENCHMARKS.md)
to ``--out`` (default ``runs/gpu-check``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dune_scale.cli.bench import or_dash

REPO = Path(__file__).resolve().parents[2]
# Variants of the step benchmark besides the base configuration (teachers compiled, fp32 residual).
# Eager teachers (the ≥ 1.1× target) and the fastest bf16 settings: with the base and the reference,
# what fits the step part's limit on an H200 (measured 2026-11-28). FP8 teachers and 128 images per
# GPU are a second call: `--parts step --variants "teachers.dtype=fp8 ..." "train.batch_size_per_rank=128 ..."`.
DEFAULT_VARIANTS = ("teachers.compile=false", "teachers.residual=bf16 train.compile=true")


PART_KEYS = ("tests", "loss", "step")


@dataclass
class Part:
    key: str  # one of PART_KEYS (``--parts``)
    name: str
    command: list[str]
    timeout_s: int
    result_file: str  # what the part writes into --out (the tests' outcome log or the program's JSON)
    returncode: int | None = None
    seconds: float = 0.0
    log_tail: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPU acceptance: gpu tests, loss-kernel and step benchmarks (< 8 min)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check")
    parser.add_argument("--config", default=str(REPO / "configs" / "vitb14_448.yaml"))
    parser.add_argument("--batch", type=int, default=64, help="step benchmark batch per GPU (default 64)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS), metavar="OVERRIDES")
    parser.add_argument(
        "--reference", default="seed", help="reference variants (default seed: the targets are ratios to it; "
        "seed,compiled adds ~90 s)",
    )
    parser.add_argument(
        "--parts", default=",".join(PART_KEYS), help=f"comma-separated parts to run, of {','.join(PART_KEYS)} (default all)",
    )
    args = parser.parse_args(argv)
    args.parts = tuple(key.strip() for key in args.parts.split(",") if key.strip())
    unknown = sorted(set(args.parts) - set(PART_KEYS))
    if unknown or not args.parts:
        parser.error(f"--parts: {', '.join(unknown) or 'none given'}; choose from {', '.join(PART_KEYS)}")
    return args


def build_parts(args: argparse.Namespace) -> list[Part]:
    """The parts ``--parts`` names, in the order tests, loss, step."""
    out, python = args.out, sys.executable
    parts = [
        # One hanging test fails at 100 s (pytest-timeout) and the others still run within the part's limit.
        Part("tests", "gpu tests", [python, "-m", "pytest", "-q", "-rfE", "-m", "gpu", "-p", "no:cacheprovider",
                                    "--timeout=100", str(REPO / "tests" / "test_gpu.py")], 150, "tests.jsonl"),
        Part("loss", "loss kernel", [python, str(REPO / "launch" / "bench_loss.py"), "--iters", "20", "--out", str(out / "loss.json")],
             40, "loss.json"),
        Part(
            "step", "step vs reference",
            [python, str(REPO / "launch" / "bench.py"), "--config", args.config, "--random-init",
             f"train.batch_size_per_rank={args.batch}", "run.console=none", f"run.output_dir={out / 'bench-run'}",
             "--steps", str(args.steps), "--warmup", "2", "--reference", "--reference-variants", args.reference,
             "--json", str(out / "bench.json"),
             *(["--variants", *args.variants] if args.variants else [])],
            280, "bench.json",
        ),
    ]  # fmt: skip
    return [part for part in parts if part.key in args.parts]


def run_part(part: Part, env: dict[str, str]) -> None:
    start = time.perf_counter()
    try:
        done = subprocess.run(part.command, cwd=REPO, env=env, capture_output=True, text=True, timeout=part.timeout_s)
        part.returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:  # its stdout/stderr are bytes whatever text= said
        part.returncode = 124
        captured = (s.decode(errors="replace") if isinstance(s, bytes) else s or "" for s in (err.stdout, err.stderr))
        output = "".join(captured) + f"\n[timed out after {part.timeout_s} s]"
    part.seconds = time.perf_counter() - start
    part.log_tail = output[-4000:]
    print(f"{part.name}: exit {part.returncode} in {part.seconds:.0f} s", flush=True)


def finished_tests(path: Path) -> dict[str, Any]:
    """Each finished test's outcome, as tests/outcome_log.py appends them (``DUNE_TEST_REPORT``): a
    part stopped at its time limit keeps the tests it finished, failure messages included."""
    if not path.is_file():
        return {}
    return {"tests": [json.loads(line) for line in path.read_text().splitlines() if line.strip()]}


def _first_line(message: str | None) -> str:
    """A failure's exception line, fit for a table cell."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    return lines[0].replace("|", "/")[:160] if lines else ""


def _per_teacher_table(rows: list[dict[str, Any]]) -> list[str]:
    """Each step variant's time per teacher (the ``teacher_forward/<teacher>`` phases)."""
    prefix = "teacher_forward/"
    teachers = list(dict.fromkeys(p[len(prefix):] for r in rows for p in r["phases"] if p.startswith(prefix)))
    if not teachers:
        return []
    lines = ["", "| step | " + " | ".join(f"{t} ms" for t in teachers) + " |", "|---|" + "---:|" * len(teachers)]
    for r in rows:
        seconds = [(r["phases"].get(prefix + t) or {}).get("seconds") for t in teachers]
        cells = [or_dash(s and 1e3 * s, ".1f") for s in seconds]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = [f"### gpu-check {report['date']} · {report['device']} · torch {report['torch']}", ""]
    lines += ["| part | exit | seconds |", "|---|---:|---:|"]
    lines += [f"| {p['name']} | {p['returncode']} | {p['seconds']:.0f} |" for p in report["parts"]]
    results = {p["key"]: p["result"] for p in report["parts"]}
    tests = results.get("tests", {}).get("tests", [])
    if tests:
        lines += ["", "| gpu test | outcome | s | message |", "|---|---|---:|---|"]
        lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']:.1f} | {_first_line(t.get('message'))} |" for t in tests]
    loss = results.get("loss")
    if loss:
        lines += ["", f"Loss kernel, B {loss['batch']}, D {loss['dim']}, {loss['dtype']}, copy {loss['copy_GBps']:.0f} GB/s:", "",
                  "| tokens | impl | ms | host ms | CUDA-graph ms | % of copy | graph % of copy | × eager |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        lines += [
            f"| {r['tokens']} | {r['impl']} | {r['ms']:.3f} | {r['host_ms']:.3f} | {or_dash(r.get('graph_ms'), '.3f')} | "
            f"{r['pct_copy_bw']:.1f} | {or_dash(r.get('graph_pct_copy_bw'), '.1f')} | {r['speedup_vs_eager']:.2f} |"
            for r in loss["results"]
        ]
    bench = results.get("step")
    if bench:
        reference = (bench.get("reference") or {}).get("results", [])
        names = [r["name"] for r in reference if r["status"] == "ok"]
        lines += ["", "| step | img/s | step ms | teachers ms | peak GiB | " + " | ".join(f"÷ ref {n}" for n in names) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(names)]  # fmt: skip
        for r in bench["results"]:
            if r["status"] != "ok":
                lines.append(f"| {r['name']} | failed: {r['error'][:80]} |")
                continue
            ratios = " | ".join(f"{r['ratio_to_reference'].get(n, float('nan')):.3f}" for n in names)
            teachers = r["phases"].get("teacher_forward", {}).get("seconds")
            lines.append(f"| {r['name']} | {r['img_per_s_per_rank']:.1f} | {1e3 * r['step_time_s']:.0f} | "
                         f"{or_dash(teachers and 1e3 * teachers, '.0f')} | {max(r['peak_memory_gib']):.1f} | {ratios} |")  # fmt: skip
        for r in reference:
            if r["status"] == "ok":
                lines.append(f"| reference {r['name']} | {r['img_per_s']:.1f} | {1e3 * r['step_time_s']:.0f} | "
                             f"{1e3 * r['teacher_time_s']:.0f} | {r['peak_memory_gib'] or 0:.1f} |" + " |" * len(names))  # fmt: skip
        lines += _per_teacher_table([r for r in bench["results"] if r["status"] == "ok"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible; it measures and tests the GPU path only", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    # Kernels compiled for the card (the test suite's default is the CPU interpreter).
    # The repository first, packages already on PYTHONPATH (e.g. torchao installed with --target) kept.
    python_path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    env = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1"}
    parts = build_parts(args)
    for part in parts:
        path = args.out / part.result_file
        path.unlink(missing_ok=True)  # never report an earlier call's numbers
        run_part(part, env | ({"DUNE_TEST_REPORT": str(path)} if part.key == "tests" else {}))
        part.result = finished_tests(path) if path.suffix == ".jsonl" else (json.loads(path.read_text()) if path.is_file() else {})
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "parts": [asdict(p) for p in parts],
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    print(f"written: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")
    return 0 if all(p.returncode == 0 for p in parts) else 1
