"""A resume under another strategy or another ZeRO stage is refused with the way forward, before
any rank reads a file it cannot interpret (FSDP's DCP files and, through universal checkpoints,
ZeRO's reshard to any rank count)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import REPO, TINY_CPU, launch_command, launcher_env, tiny_overrides
from dune_scale.cli.train import train
from dune_scale.config import load_config
from dune_scale.engine.compat import layout_problem

TRAIN = REPO / "launch" / "train.py"


def test_layout_rules() -> None:
    fsdp, single = {"strategy": "fsdp"}, {"strategy": "single"}
    zero2_on_2 = {"strategy": "deepspeed", "zero_stage": 2, "world_size": 2}
    assert layout_problem(fsdp, fsdp) is None
    assert layout_problem({}, single) is None  # a checkpoint from before layouts were recorded
    moved = layout_problem(single, fsdp)
    assert "strategy.name=single, this run uses strategy.name=fsdp" in moved and "student.pretrained" in moved
    # Through a universal checkpoint: another rank count, or ZeRO-1 ↔ 2; not 1/2 ↔ 3.
    assert layout_problem(zero2_on_2, {**zero2_on_2, "world_size": 3}) is None
    assert layout_problem(zero2_on_2, {**zero2_on_2, "zero_stage": 1, "world_size": 3}) is None
    restaged = layout_problem(zero2_on_2, {**zero2_on_2, "zero_stage": 3, "world_size": 3})
    assert "strategy.zero_stage=2, this run uses strategy.zero_stage=3" in restaged
    assert "resume with strategy.zero_stage=1 or 2 (on any number of ranks)" in restaged


@pytest.mark.distributed
def test_single_checkpoint_is_not_resumed_by_fsdp(tmp_path: Path, demo_shards: Path) -> None:
    out = tmp_path / "run"
    train(load_config(TINY_CPU, tiny_overrides(out, demo_shards, "train.max_steps=2", "checkpoint.every_steps=2")))
    command = launch_command(
        "torchrun", 2, TRAIN, "--config", str(TINY_CPU),
        *tiny_overrides(out, demo_shards, "strategy.name=fsdp", "train.batch_size_per_rank=6", "train.max_steps=4"),
    )
    result = subprocess.run(command, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode != 0
    assert "cannot resume from" in result.stderr and "written by strategy.name=single" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("cannot resume from")[0][-2000:]
