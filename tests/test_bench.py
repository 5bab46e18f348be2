"""launch/bench.py on tiny_cpu: the console table, the JSON report and its fields, variants (one of
which fails without stopping the others), the peak table, and synthetic batches' dataset names."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import REPO, TINY_CPU, launch_command, launcher_env
from dune_scale.cli.bench import (
    BenchOptions,
    VariantResult,
    main,
    render,
    run_benchmark,
    synthetic_batches,
    table_peak_tflops,
)
from dune_scale.config import load_config
from dune_scale.data import resolve_mixture
from dune_scale.distributed import DistInfo
from dune_scale.engine.compose import RunPlan

TEACHER_PHASES = {f"teacher_forward/{name}" for name in ("dino2reg_vitlarge_14", "mast3r_vitlarge_16", "multihmr_vitlarge_14_672")}
TRAINER_PHASES = {"data", "teacher_forward", "student_forward", "loss", "backward", "optimizer"} | TEACHER_PHASES
TINY_FLOPS_PER_IMAGE = 35_187_520  # test_flops.py's hand count
REPORT_FIELDS = {"date", "device", "world_size", "torch", "config", "overrides", "data", "options", "results", "reference"}
RESULT_FIELDS = set(VariantResult.__dataclass_fields__)


def check_ok(result: dict, steps: int) -> None:
    assert set(result) == RESULT_FIELDS
    assert result["status"] == "ok" and result["error"] is None
    assert result["steps"] == steps and len(result["step_times_s"]) == steps
    assert result["step_time_min_s"] <= result["step_time_median_s"] <= result["step_time_max_s"]
    assert result["step_time_s"] == pytest.approx(sum(result["step_times_s"]) / steps)
    assert result["img_per_s_global"] == pytest.approx(result["global_batch_size"] / result["step_time_s"])
    assert result["img_per_s_per_rank"] == pytest.approx(result["img_per_s_global"] / result["world_size"])
    assert result["flops_per_image"]["total"] == TINY_FLOPS_PER_IMAGE
    assert result["achieved_tflops_per_rank"] == pytest.approx(TINY_FLOPS_PER_IMAGE * result["img_per_s_per_rank"] / 1e12)
    assert set(result["phases"]) == TRAINER_PHASES | {"other"}
    # Phases are disjoint slices of the step: none negative, together no longer than the step; each
    # teacher's time is a part of teacher_forward and "other" is what no top-level phase covers.
    phases = {name: p["seconds"] for name, p in result["phases"].items()}
    top = [s for name, s in phases.items() if name not in TEACHER_PHASES | {"other"}]
    assert min(s for name, s in phases.items() if name != "other") >= 0 and sum(top) <= result["step_time_s"] * 1.05
    assert sum(phases[name] for name in TEACHER_PHASES) <= phases["teacher_forward"]
    assert phases["other"] == pytest.approx(result["step_time_s"] - sum(top))
    assert result["phases"]["teacher_forward"]["seconds"] > 0 and result["phases"]["backward"]["seconds"] > 0
    assert len(result["peak_memory_gib"]) == result["world_size"] and result["peak_memory_gib"][0] > 0
    assert math.isfinite(result["final_loss"])


def test_cli_prints_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The program's main in this process (launch/bench.py as a program: the torchrun test below)."""
    report_path = tmp_path / "bench.json"
    argv = ["--config", str(TINY_CPU), f"run.output_dir={tmp_path / 'run'}", "run.console=none", "--steps", "3", "--warmup", "1",
            "--json", str(report_path)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    for text in ("img/s/rank", "MFU", "peak GiB", "base", "teacher_forward", "backward", f"report: {report_path}"):
        assert text in stdout
    report = json.loads(report_path.read_text())
    assert set(report) == REPORT_FIELDS
    assert report["world_size"] == 1 and report["data"] == "synthetic" and report["reference"] is None
    assert report["options"]["steps"] == 3 and report["options"]["warmup"] == 1
    (result,) = report["results"]
    assert result["name"] == "base" and result["global_batch_size"] == 12 and result["image_size"] == 56
    check_ok(result, steps=3)
    assert result["peak_tflops"] is None and result["mfu"] is None  # a CPU has no table peak
    assert not (tmp_path / "run").exists()  # the benchmark writes no checkpoints or metrics


def test_variants_in_one_call_and_a_failing_one(tmp_path: Path) -> None:
    variants = ["loss.fused=false train.activation_checkpointing=true", "student.pretrained=/nonexistent/student.pt"]
    options = BenchOptions(steps=2, warmup=1, peak_tflops=1.0)
    report = run_benchmark(str(TINY_CPU), ["run.console=none", f"run.output_dir={tmp_path}"], variants, options, DistInfo())
    base, both, broken = report["results"]
    assert [r["name"] for r in report["results"]] == ["base", *variants]
    assert both["overrides"] == ["loss.fused=false", "train.activation_checkpointing=true"]
    for result in (base, both):
        check_ok(result, steps=2)
        assert result["mfu"] == pytest.approx(result["achieved_tflops_per_rank"] / 1.0)
    assert broken["status"] == "failed" and "nonexistent" in broken["error"]

    console = Console(record=True, width=200)
    render(report, console)
    text = console.export_text()
    assert "failed" in text and broken["error"].split(":")[0] in text
    assert "loss.fused=false train.activation_checkpointing=true" in text


def test_bad_base_config_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(TINY_CPU), "train.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce GTX 1080", None),
        ("CPU (2 threads)", None),
    ],
)
def test_peak_table(name: str, peak: float | None) -> None:
    assert table_peak_tflops(name) == peak


def test_synthetic_batches_are_teacher_balanced() -> None:
    cfg = load_config(TINY_CPU, ["train.batch_size_per_rank=64", "data.mixture=teacher_balanced"])
    mixture = resolve_mixture(cfg.data.mixture, cfg.data.balance, cfg.data.remote_root)
    batches = synthetic_batches(cfg, RunPlan(mixture, batch_size_per_rank=64), torch.device("cpu"), rank=0)
    assert len(batches) >= 2 and batches[0]["images"].shape == (64, 3, 56, 56)
    assert not batches[0]["images"].equal(batches[1]["images"])
    domains = Counter(mixture.domain_of(name) for name in batches[0]["dataset"])
    assert sorted(domains.values()) == [21, 21, 22]  # one third each, as the loader makes them
    assert Counter(batches[0]["dataset"])["in19k"] > Counter(batches[0]["dataset"])["mapillarystreet"]  # size-weighted


def test_real_data_loader(demo_shards: Path, tmp_path: Path) -> None:
    """Also with validation asked for: benchmarking does not validate, so no validation data is needed."""
    overrides = ["run.console=none", f"run.output_dir={tmp_path}", f"data.remote_root={demo_shards}", "data.num_workers=0",
                 "eval.every_steps=1"]
    report = run_benchmark(str(TINY_CPU), overrides, [], BenchOptions(steps=2, warmup=1, real_data=True), DistInfo())
    assert report["data"] == "loader"
    (result,) = report["results"]
    check_ok(result, steps=2)
    assert result["phases"]["data"]["seconds"] > 0  # decoding and augmenting on the main process


@pytest.mark.distributed
def test_torchrun_two_ranks_fsdp(tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    command = launch_command(
        "torchrun", 2, REPO / "launch" / "bench.py", "--config", str(TINY_CPU), "run.console=none",
        f"run.output_dir={tmp_path / 'run'}", "strategy.name=fsdp", "--steps", "2", "--warmup", "1",
        "--json", str(report_path),
    )
    done = subprocess.run(command, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("img/s/rank") == 1  # rank 0 alone prints
    report = json.loads(report_path.read_text())
    (result,) = report["results"]
    assert report["world_size"] == result["world_size"] == 2 and result["global_batch_size"] == 24
    check_ok(result, steps=2)


def test_reference_step_side_by_side(tmp_path: Path) -> None:
    """--reference times the seed-style step for the base config's shapes and gives every variant
    its ratio to it; a failing reference variant is reported without hiding the others."""
    options = BenchOptions(steps=2, warmup=1, reference=("seed", "bf16teach"))
    report = run_benchmark(str(TINY_CPU), ["run.console=none", f"run.output_dir={tmp_path}"], ["loss.fused=false"], options, DistInfo())
    reference = report["reference"]
    work = reference["work"]
    assert work["batch_size"] == 12 and work["image_size"] == 56
    assert work["student"]["embed_dim"] == 48 and work["student"]["reg_tokens"] == 4
    assert work["teachers"]["mast3r_vitlarge_16"]["img_size"] == 64  # 56 px / 14 · 16: the same token grid
    assert work["teachers"]["mast3r_vitlarge_16"]["init_values"] is None
    assert [r["name"] for r in reference["results"]] == ["seed", "bf16teach"]
    for ref in reference["results"]:
        assert ref["status"] == "ok", ref["error"]
        assert ref["img_per_s"] == pytest.approx(12 / ref["step_time_s"]) and math.isfinite(ref["final_loss"])
    for result in report["results"]:
        assert set(result["ratio_to_reference"]) == {"seed", "bf16teach"}
        for ref in reference["results"]:
            ratio = result["ratio_to_reference"][ref["name"]]
            assert ratio == pytest.approx(result["img_per_s_per_rank"] / ref["img_per_s"])
    console = Console(record=True, width=200)
    render(report, console)
    assert "reference img/s" in console.export_text()

    from dune_scale.cli.bench_loss import markdown as loss_markdown
    from dune_scale.cli.gpu_check import markdown  # the gpu-check table of such a report

    row = {"tokens": 577, "impl": "triton", "ms": 0.5, "host_ms": 0.45, "graph_ms": None, "effective_GBps": 1500.0,
           "pct_copy_bw": 35.0, "speedup_vs_eager": 17.0, "peak_extra_MiB": 10.0}
    loss = {"batch": 128, "dim": 1024, "dtype": "bf16", "copy_GBps": 4200.0, "results": [row, {**row, "graph_ms": 0.25, "graph_pct_copy_bw": 70.0}]}
    assert "| 577 | triton | 0.500 | 0.450 | — |" in loss_markdown(loss["results"], 4200.0)
    parts = [{"key": k, "name": k, "returncode": 0, "seconds": 1.0, "result": r} for k, r in (("tests", {}), ("loss", loss), ("step", report))]
    table = markdown({"date": "d", "device": "cpu", "torch": torch.__version__, "parts": parts})
    assert "| 577 | triton | 0.500 | 0.450 | 0.250 | 35.0 | 70.0 | 17.00 |" in table
    base_ratio = report["results"][0]["ratio_to_reference"]["seed"]
    assert "÷ ref seed" in table and f"| base | {report['results'][0]['img_per_s_per_rank']:.1f} |" in table
    assert f"{base_ratio:.3f}" in table and "| reference bf16teach |" in table
    assert "| step | dino2reg_vitlarge_14 ms | mast3r_vitlarge_16 ms | multihmr_vitlarge_14_672 ms |" in table


def test_reference_needs_known_variants(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(TINY_CPU), "--reference", "--reference-variants", "seed,fastest"])
    assert exit_info.value.code == 2 and "fastest" in capsys.readouterr().err


def test_gpu_check_parts_are_valid_commands_within_8_minutes(tmp_path: Path) -> None:
    """make gpu-check's subprocess commands parse with the programs' own parsers, and the parts'
    time limits add up to less than 8 minutes."""
    from dune_scale.cli import gpu_check
    from dune_scale.cli.bench import parse_args
    from dune_scale.cli.bench_loss import parse_args as parse_loss_args

    tests, loss, step = gpu_check.build_parts(gpu_check.parse_args(["--out", str(tmp_path)]))
    assert tests.command[-1].endswith("tests/test_gpu.py") and "gpu" in tests.command and tests.result_file == "tests.jsonl"
    assert loss.command[1].endswith("launch/bench_loss.py")
    assert parse_loss_args(loss.command[2:]).out == tmp_path / "loss.json"
    bench = parse_args(step.command[2:])
    assert bench.reference and bench.reference_variants == ("seed",) and bench.json == tmp_path / "bench.json"
    assert bench.variants == list(gpu_check.DEFAULT_VARIANTS)
    assert sum(part.timeout_s for part in (tests, loss, step)) < 8 * 60
    (only_step,) = gpu_check.build_parts(gpu_check.parse_args(["--out", str(tmp_path), "--parts", "step"]))
    assert only_step.command == step.command
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "step,everything"])


def test_gpu_check_path_needs_no_deepspeed_streaming_wandb_or_torchao(tmp_path: Path) -> None:
    """The GPU machine has none of them: the gpu tests collect, the step bench and its reference run,
    and a bf16 run checkpoints and resumes with every one of them failing to import."""
    worker = REPO / "tests" / "workers" / "without_optional_packages.py"
    done = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ran without the optional packages" in done.stdout


def test_gpu_check_keeps_finished_tests_of_a_part_stopped_at_its_limit(tmp_path: Path) -> None:
    """A test part that runs out of time still reports every test it finished, with the failure's
    message, and its log tail is text."""
    from dune_scale.cli import gpu_check

    (tmp_path / "test_part.py").write_text(
        "import time\n\ndef test_fails():\n    assert 1 + 1 == 3, 'arithmetic broke'\n\n"
        "def test_passes():\n    pass\n\ndef test_hangs():\n    time.sleep(600)\n"
    )
    report = tmp_path / "tests.jsonl"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "outcome_log", str(tmp_path / "test_part.py")]
    part = gpu_check.Part("tests", "gpu tests", command, 5, report.name)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "DUNE_TEST_REPORT": str(report)}
    gpu_check.run_part(part, env)
    outcomes = gpu_check.finished_tests(report)["tests"]
    assert part.returncode == 124 and "[timed out after 5 s]" in part.log_tail and "b'" not in part.log_tail
    assert [(t["test"], t["outcome"]) for t in outcomes] == [("test_fails", "failed"), ("test_passes", "passed")]
    assert "arithmetic broke" in outcomes[0]["message"]
    table = gpu_check.markdown({"date": "d", "device": "cpu", "torch": "t", "parts": [{**vars(part), "result": {"tests": outcomes}}]})
    assert "| test_fails | failed |" in table and "arithmetic broke" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_gpu_check_without_a_gpu_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dune_scale.cli import gpu_check

    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "no CUDA GPU visible" in capsys.readouterr().err and not (tmp_path / "out").exists()
