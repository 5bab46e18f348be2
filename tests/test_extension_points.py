"""A strategy and an export format are each one module plus one line in their table
(``STRATEGIES``, ``FORMATS``): a toy of each (``toy_strategy.py``, ``toy_format.py``) registered
here trains, saves, resumes and exports end to end; and the strategies' own launch rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import toy_format
import toy_strategy

from conftest import REPO, TINY_CPU, tiny_overrides
from dune_scale import load_encoder
from dune_scale.cli.export import main as export_main
from dune_scale.cli.train import train
from dune_scale.config import ConfigError, load_config
from dune_scale.distributed import DistInfo
from dune_scale.engine.compose import check_run
from dune_scale.engine.export import FORMATS
from dune_scale.engine.strategies import STRATEGIES
from dune_scale.telemetry.metrics import read_metrics


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    """3 steps under strategy.name=toy, a checkpoint after each (the last two kept)."""
    out = tmp_path_factory.mktemp("toy") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(STRATEGIES, "toy", toy_strategy.ToyStrategy)
        train(load_config(TINY_CPU, tiny_overrides(out, demo_shards, "strategy.name=toy", "train.max_steps=3",
                                                   "checkpoint.every_steps=1")))
    return out


def test_a_registered_strategy_trains_saves_resumes_and_exports(toy_run: Path, demo_shards: Path, monkeypatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setitem(STRATEGIES, "toy", toy_strategy.ToyStrategy)
    step_2 = toy_run / "checkpoints" / "step_000000002"
    assert sorted(p.name for p in (step_2 / "toy").iterdir()) == ["optimizer.pt", "student.safetensors"]
    assert not (step_2 / "model.pt").exists()  # its own layout, not single's
    # Resumed from step 2 through the toy's load: step 3 as the uninterrupted run had it.
    resumed = tmp_path / "resumed"
    train(load_config(TINY_CPU, tiny_overrides(resumed, demo_shards, "strategy.name=toy", "train.max_steps=3",
                                               f"checkpoint.resume={step_2}")))
    straight = {r["step"]: r["loss"] for r in read_metrics(toy_run / "metrics.jsonl")}
    assert [(r["step"], r["loss"]) for r in read_metrics(resumed / "metrics.jsonl")] == [(3, straight[3])]
    # Export reads the checkpoint through the toy's reader, chosen from what the checkpoint records.
    hf = tmp_path / "hf"
    assert export_main([str(toy_run / "checkpoints" / "step_000000003"), "--format", "hf", "--out", str(hf)]) == 0
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_encoder(hf).forward_features(x)["patch"], load_encoder(toy_run / "student.safetensors").forward_features(x)["patch"])
    # Without its registration, a checkpoint of it is named, not misread.
    monkeypatch.delitem(STRATEGIES, "toy")
    assert export_main([str(step_2), "--format", "hf", "--out", str(tmp_path / "unknown")]) == 2


def test_a_registered_format_is_a_choice_with_its_switch(toy_run: Path, monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(FORMATS, "npz", toy_format.FORMAT)
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "npz: the encoder's tensors in one NumPy .npz" in capsys.readouterr().out
    out = tmp_path / "encoder.npz"
    assert export_main([str(toy_run / "student.safetensors"), "--format", "npz", "--half", "--out", str(out)]) == 0
    stored = np.load(out)
    encoder = load_encoder(toy_run / "student.safetensors").vit.state_dict()
    assert sorted(stored.files) == sorted(encoder) and stored["pos_embed"].dtype == np.float16
    assert np.array_equal(stored["pos_embed"], encoder["pos_embed"].half().numpy())
    with pytest.raises(SystemExit) as stop:
        export_main([str(toy_run / "student.safetensors"), "--format", "dune", "--half", "--out", str(tmp_path / "x.pth")])
    assert stop.value.code == 2 and "--half stores float16 (half the size): use it with --format npz" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, dist, message",
    [
        (["strategy.name=ddp"], DistInfo(), "strategy.name: 'ddp' is not allowed; choose one of single | fsdp | deepspeed"),
        (["strategy.name=single"], DistInfo(world_size=2, local_world_size=2), "strategy.name=single runs one process, but 2"),
        (["strategy.name=fsdp", "train.compile_scope=model"], DistInfo(),
         "train.compile_scope: 'model' is not allowed; FSDP2 shards each block"),
        (["strategy.name=fsdp", "strategy.deepspeed_config=ds.json"], DistInfo(),
         "strategy.deepspeed_config is set but strategy.name=fsdp; it only applies to deepspeed"),
        (["strategy.name=deepspeed", "strategy.fsdp_param_dtype=bf16"], DistInfo(),
         "strategy.fsdp_param_dtype is set but strategy.name=deepspeed; it only applies to fsdp"),
    ],
)
def test_each_strategy_refuses_what_it_cannot_do_before_any_work(overrides: list[str], dist: DistInfo, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_run(load_config(REPO / "configs" / "vitb14_336.yaml", overrides), dist)
    assert str(err.value).startswith(message), err.value
