"""Strategies on 2 CPU ranks (gloo, 127.0.0.1): train, checkpoint, resume, and agree with `single`.

Every run is a real launcher (`torchrun` / `deepspeed`) in a subprocess with a timeout. In fp32 with
the same global batch and teacher dropping off, the strategies compute the same losses; resumed runs
continue bitwise as if never stopped. Clipping binds (per parameter, the default), so sharded
strategies also have to clip shards by the norm of the whole parameter to agree.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_CPU, global_batches, launch_command, launcher_env, tiny_overrides
from dune_scale.telemetry.metrics import read_metrics

pytestmark = pytest.mark.distributed
TRAIN = REPO / "launch" / "train.py"
LAUNCHER = {"single": ("python", 1), "fsdp": ("torchrun", 2), "deepspeed": ("deepspeed", 2)}
# Low enough that the default per-parameter clipping binds on most parameters of the tiny student, so
# the comparison with `single` also checks that shards/partitions are clipped by full-parameter norms.
CLIP = 0.05


def run_training(strategy: str, out: Path, shards: Path, *extra: str, stage: int = 2, timeout: int = 300) -> list[dict]:
    launcher, nproc = LAUNCHER[strategy]
    overrides = tiny_overrides(out, shards, f"strategy.name={strategy}", f"strategy.zero_stage={stage}",
                               f"train.batch_size_per_rank={24 // nproc}", "distill.teacher_drop=none",
                               "run.log_samples=true", f"optim.grad_clip={CLIP}", *extra)
    command = launch_command(launcher, nproc, TRAIN, "--config", str(TINY_CPU), *overrides)
    result = subprocess.run(command, env=launcher_env(out.parent), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{strategy} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return read_metrics(out / "metrics.jsonl")


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("single") / "run"
    return out, run_training("single", out, demo_shards, "train.max_steps=5")


# ZeRO-1 shares DeepSpeed's stage-1/2 optimizer with ZeRO-2; bitwise resume after a stop signal is
# test_preemption's (single, FSDP, ZeRO-2), kept out of here to hold the suite's time.
@pytest.mark.parametrize("strategy, stage", [("fsdp", 0), ("deepspeed", 2), ("deepspeed", 3)])
def test_strategy_trains_checkpoints_resumes_and_matches_single(
    strategy: str, stage: int, tmp_path: Path, demo_shards: Path, single_run: tuple[Path, list[dict]]
) -> None:
    single_dir, single = single_run
    out = tmp_path / "run"
    first = run_training(strategy, out, demo_shards, "train.max_steps=5", "checkpoint.every_steps=3", stage=stage or 2)
    assert global_batches(out) == global_batches(single_dir)  # same samples per global batch
    for mine, reference in zip(losses(first), losses(single)):
        assert mine == pytest.approx(reference, rel=1e-4)
    # The full student weights are exported whatever the sharding (ZeRO-3 and FSDP gather them).
    exported, reference_weights = load_file(str(out / "student.safetensors")), load_file(str(single_dir / "student.safetensors"))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in reference_weights.items()}
    resumed = run_training(strategy, out, demo_shards, "train.max_steps=7", "checkpoint.every_steps=3", stage=stage or 2)
    assert [r["step"] for r in resumed] == list(range(1, 8))
    assert losses(resumed)[:5] == losses(first)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000000007"


def test_sharded_teachers_give_the_replicated_features(tmp_path: Path) -> None:
    worker = REPO / "tests" / "workers" / "teacher_shard.py"
    result = subprocess.run(launch_command("torchrun", 2, worker, str(tmp_path)), env=launcher_env(tmp_path),
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        diffs = torch.load(tmp_path / f"diff_{rank}.pt", weights_only=True)
        assert diffs and max(diffs.values()) <= 1e-5, diffs


def test_unsupported_launch_is_named_before_any_work(tmp_path: Path, demo_shards: Path) -> None:
    out = tmp_path / "run"
    command = launch_command("torchrun", 2, TRAIN, "--config", str(TINY_CPU), *tiny_overrides(out, demo_shards, "strategy.name=single"))
    result = subprocess.run(command, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0
    assert "strategy.name=single runs one process, but 2 were launched" in result.stderr
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("strategy", ["fsdp"])  # accumulation is the trainer's, whatever the strategy
def test_gradient_accumulation_under_sharding_matches_single(strategy: str, tmp_path: Path, demo_shards: Path) -> None:
    """2 ranks × 6 images × 2 micro-batches == 1 rank × 12 × 2 (same loader batches, same statistics)."""
    accum = ("train.grad_accum_steps=2", "train.max_steps=3", "optim.lr_reference_batch=24")
    single = run_training("single", tmp_path / "single", demo_shards, "train.batch_size_per_rank=12", *accum)
    sharded = run_training(strategy, tmp_path / strategy, demo_shards, "train.batch_size_per_rank=6", *accum)
    assert global_batches(tmp_path / strategy) == global_batches(tmp_path / "single")
    assert [r["samples_seen"] for r in sharded] == [24, 48, 72]
    for mine, reference in zip(losses(sharded), losses(single)):
        assert mine == pytest.approx(reference, rel=1e-4)


def test_fsdp_in_bf16_keeps_fp32_parameters_like_single(tmp_path: Path, demo_shards: Path) -> None:
    """bf16 comes from autocast around fp32 parameters under FSDP too (strategy.fsdp_param_dtype=fp32):
    the first step's forward is then the one `single` computes, to float noise; bf16 compute copies of
    the parameters (the option) move it by ~6e-6 here."""
    bf16 = ("train.precision=bf16", "train.max_steps=3")
    single = losses(run_training("single", tmp_path / "single", demo_shards, *bf16))
    fsdp = losses(run_training("fsdp", tmp_path / "fsdp", demo_shards, *bf16))
    assert fsdp[0] == pytest.approx(single[0], rel=1e-6)
    assert fsdp == pytest.approx(single, rel=1e-4)


def test_nonfinite_teacher_loss_on_two_ranks_skips_then_stops_every_rank(tmp_path: Path, demo_shards: Path) -> None:
    """A teacher whose features are NaN (a corrupt checkpoint): both ranks skip the same updates,
    save only finite states, and stop together once the consecutive-skip limit is passed."""
    from dune_scale.engine.checkpointer import is_complete
    from dune_scale.teachers import build_teacher

    teacher = build_teacher("dino2reg_vitlarge_14", embed_dim=64, depth=2, num_heads=4, img_size=70)
    weights = teacher.state_dict()
    weights["norm.weight"] = torch.full_like(weights["norm.weight"], float("nan"))
    torch.save(weights, tmp_path / "nan_teacher.pth")
    out = tmp_path / "run"
    overrides = tiny_overrides(out, demo_shards, "strategy.name=fsdp", "train.batch_size_per_rank=6", "train.max_steps=4",
                               "checkpoint.every_steps=1", "train.nonfinite=skip", "train.max_nonfinite_skips=1",
                               f"teachers.models.0.checkpoint={tmp_path / 'nan_teacher.pth'}", "teachers.models.0.random_init=false")
    command = launch_command("torchrun", 2, TRAIN, "--config", str(TINY_CPU), *overrides)
    result = subprocess.run(command, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode != 0
    assert "step 1: the loss of teacher dino2reg_vitlarge_14 is not finite; update skipped" in result.stderr
    assert result.stderr.count("step 2: the loss of teacher dino2reg_vitlarge_14 is not finite; that is 2 consecutive") == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000000001"]
    assert is_complete(out / "checkpoints" / "step_000000001")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(out / "checkpoints" / "step_000000001" / "fsdp", tmp_path / "step1.pt")
    saved = torch.load(tmp_path / "step1.pt", weights_only=True)["model"]
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
