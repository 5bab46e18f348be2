"""``make gpu-check``: the GPU acceptance run, one command, under 8 minutes on one GPU.

Three parts, each a subprocess with its own time limit (a part that hangs or fails is reported,
the next still runs): ``pytest -m gpu`` (kernels compiled for the card, compiled / CUDA-graph /
FP8 teachers vs eager, a bf16 training run with resume), ``python launch/bench_loss.py``,
and ``launch/bench.py --reference`` on ``configs/vitb14_448.yaml`` (random weights, synthetic
batches: neither checkpoints, DeepSpeed nor Streaming are needed). Writes ``gpu_check.json``
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
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
# Variants of the step benchmark besides the base configuration (teachers compiled, fp32 residual).
DEFAULT_VARIANTS = ("teachers.compile=false", "teachers.residual=bf16 train.compile=true")


@dataclass
class Part:
    name: str
    command: list[str]
    timeout_s: int
    returncode: int | None = None
    seconds: float = 0.0
    log_tail: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPU acceptance: gpu tests, loss-kernel and step benchmarks (< 8 min)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check")
    parser.add_argument("--config", default=str(REPO / "configs" / "vitb14_448.yaml"))
    parser.add_argument("--batch", type=int, default=64, help="step benchmark batch per GPU (default 64)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS), metavar="OVERRIDES")
    parser.add_argument(
        "--reference", default="seed", help="reference variants (default seed: the targets are ratios to it; "
        "seed,compiled adds ~90 s)",
    )
    return parser.parse_args(argv)


def build_parts(args: argparse.Namespace) -> list[Part]:
    out, python = args.out, sys.executable
    return [
        Part("gpu tests", [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_gpu.py"), f"--junitxml={out / 'pytest.xml'}"], 170),
        Part("loss kernel", [python, str(REPO / "launch" / "bench_loss.py"), "--iters", "20", "--out", str(out / "loss.json")], 50),
        Part(
            "step vs reference",
            [python, str(REPO / "launch" / "bench.py"), "--config", args.config, "--random-init",
             f"train.batch_size_per_rank={args.batch}", "run.console=none", f"run.output_dir={out / 'bench-run'}",
             "--steps", str(args.steps), "--warmup", "3", "--reference", "--reference-variants", args.reference,
             "--json", str(out / "bench.json"),
             *(["--variants", *args.variants] if args.variants else [])],
            250,
        ),
    ]


def run_part(part: Part, env: dict[str, str]) -> None:
    start = time.perf_counter()
    try:
        done = subprocess.run(part.command, cwd=REPO, env=env, capture_output=True, text=True, timeout=part.timeout_s)
        part.returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        part.returncode = 124
        output = f"{err.stdout or ''}{err.stderr or ''}\n[timed out after {part.timeout_s} s]"
        output = output if isinstance(output, str) else output.decode(errors="replace")
    part.seconds = time.perf_counter() - start
    part.log_tail = output[-4000:]
    print(f"{part.name}: exit {part.returncode} in {part.seconds:.0f} s", flush=True)


def pytest_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    suite = ElementTree.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
    return {"tests": cases}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"### gpu-check {report['date']} · {report['device']} · torch {report['torch']}", ""]
    lines += ["| part | exit | seconds |", "|---|---:|---:|"]
    lines += [f"| {p['name']} | {p['returncode']} | {p['seconds']:.0f} |" for p in report["parts"]]
    tests = report["parts"][0]["result"].get("tests", [])
    if tests:
        lines += ["", "| gpu test | outcome | s |", "|---|---|---:|"]
        lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']:.1f} |" for t in tests]
    loss = report["parts"][1]["result"]
    if loss:
        lines += ["", f"Loss kernel, B {loss['batch']}, D {loss['dim']}, {loss['dtype']}, copy {loss['copy_GBps']:.0f} GB/s:", "",
                  "| tokens | impl | ms | host ms | CUDA-graph ms | % of copy | × eager |", "|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        lines += [
            f"| {r['tokens']} | {r['impl']} | {r['ms']:.3f} | {r['host_ms']:.3f} | {r['graph_ms'] or float('nan'):.3f} | "
            f"{r['pct_copy_bw']:.1f} | {r['speedup_vs_eager']:.2f} |"
            for r in loss["results"]
        ]
    bench = report["parts"][2]["result"]
    if bench:
        reference = (bench.get("reference") or {}).get("results", [])
        names = [r["name"] for r in reference if r["status"] == "ok"]
        lines += ["", "| step | img/s | step ms | peak GiB | " + " | ".join(f"÷ ref {n}" for n in names) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(names)]  # fmt: skip
        for r in bench["results"]:
            if r["status"] != "ok":
                lines.append(f"| {r['name']} | failed: {r['error'][:80]} |")
                continue
            ratios = " | ".join(f"{r['ratio_to_reference'].get(n, float('nan')):.3f}" for n in names)
            lines.append(f"| {r['name']} | {r['img_per_s_per_rank']:.1f} | {1e3 * r['step_time_s']:.0f} | "
                         f"{max(r['peak_memory_gib']):.1f} | {ratios} |")  # fmt: skip
        for r in reference:
            if r["status"] == "ok":
                lines.append(f"| reference {r['name']} | {r['img_per_s']:.1f} | {1e3 * r['step_time_s']:.0f} | "
                             f"{r['peak_memory_gib'] or 0:.1f} |" + " |" * len(names))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible; it measures and tests the GPU path only", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    # Kernels compiled for the card (the test suite's default is the CPU interpreter).
    env = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    parts = build_parts(args)
    for part, result_file in zip(parts, ("pytest.xml", "loss.json", "bench.json")):
        path = args.out / result_file
        path.unlink(missing_ok=True)  # never report an earlier call's numbers
        run_part(part, env)
        part.result = pytest_summary(path) if path.suffix == ".xml" else (json.loads(path.read_text()) if path.is_file() else {})
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
