"""The GPU acceptance path on a machine without DeepSpeed, Streaming, wandb or torchao (the GPU
machine as it is): pytest collects the gpu tests, the step benchmark and its reference run, and
the gpu tests' bf16 run saves and resumes. ``python without_optional_packages.py OUT_DIR``."""

import sys
from pathlib import Path

for missing in ("streaming", "deepspeed", "wandb", "torchao"):
    sys.modules[missing] = None  # importing it now raises ModuleNotFoundError, as where it is not installed

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import pytest  # noqa: E402

from dune_scale.cli.bench import BenchOptions, run_benchmark  # noqa: E402
from dune_scale.distributed import DistInfo  # noqa: E402


def main(out: Path) -> None:
    assert pytest.main(["-q", "--collect-only", "-p", "no:cacheprovider", str(REPO / "tests" / "test_gpu.py")]) == 0
    # A test runs through the shared fixtures (on CPU every gpu test skips before they run).
    assert pytest.main(["-q", "-p", "no:cacheprovider", f"{REPO / 'tests' / 'test_bench.py'}::test_peak_table"]) == 0
    options = BenchOptions(steps=1, warmup=0, reference=("seed",))
    overrides = ["run.console=none", f"run.output_dir={out / 'bench'}"]
    report = run_benchmark(str(REPO / "configs" / "tiny_cpu.yaml"), overrides, [], options, DistInfo())
    rows = report["results"] + report["reference"]["results"]
    assert all(row["status"] == "ok" for row in rows), [row["error"] for row in rows]
    from test_gpu import tiny_bf16_trainer_run

    straight, folder = tiny_bf16_trainer_run(out / "run", [], 4, save_at=2, device="cpu")
    resumed, _ = tiny_bf16_trainer_run(out / "run", [], 4, resume=folder, device="cpu")
    assert resumed == straight[2:], (straight, resumed)
    print("gpu-check path ran without the optional packages")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
