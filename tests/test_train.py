"""End-to-end single-process training on tiny_cpu: the loss falls, checkpoints resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY_CPU, tiny_overrides
from dune_scale.cli.train import train
from dune_scale.config import ConfigError, load_config
from dune_scale.engine.checkpointer import LATEST, MANIFEST, TRAINER_STATE
from dune_scale.telemetry.metrics import read_metrics


def _run(output: Path, shards: Path, *extra: str) -> list[dict]:
    train(load_config(TINY_CPU, tiny_overrides(output, shards, *extra)))
    return read_metrics(output / "metrics.jsonl")


def test_tiny_run_learns_and_writes_outputs(tmp_path: Path, demo_shards: Path) -> None:
    out = tmp_path / "run"
    records = _run(out, demo_shards, "train.total_steps=30", "checkpoint.every_steps=10")
    assert [r["step"] for r in records] == list(range(1, 31))
    teachers = ["dino2reg_vitlarge_14", "mast3r_vitlarge_16", "multihmr_vitlarge_14_672"]
    for key in ["step", "samples_seen", "loss", "lr", "img_per_s", *(f"loss_{t}" for t in teachers)]:
        assert key in records[0]
    assert records[-1]["samples_seen"] == 30 * 12
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert (out / "config.yaml").is_file()
    checkpoints = out / "checkpoints"
    assert (checkpoints / LATEST).read_text().strip() == "step_000000030"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000000020", "step_000000030"]  # keep_last=2
    assert (checkpoints / "step_000000030" / MANIFEST).is_file()


def test_resume_continues_at_the_right_step_with_the_same_losses(tmp_path: Path, demo_shards: Path) -> None:
    straight = _run(tmp_path / "straight", demo_shards, "train.max_steps=8", "checkpoint.every_steps=4")
    resumed_dir = tmp_path / "resumed"
    first = _run(resumed_dir, demo_shards, "train.max_steps=5", "checkpoint.every_steps=4")
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    # Step 5 was logged after the step-4 checkpoint... and step 5 saved at the end: resume from 5.
    second = _run(resumed_dir, demo_shards, "train.max_steps=8", "checkpoint.every_steps=4")
    assert [r["step"] for r in second] == list(range(1, 9))
    assert [r["loss"] for r in second] == [r["loss"] for r in straight]
    assert [r["samples_seen"] for r in second] == [r["samples_seen"] for r in straight]


def test_resume_refuses_another_architecture(tmp_path: Path, demo_shards: Path) -> None:
    out = tmp_path / "run"
    _run(out, demo_shards, "train.max_steps=2", "checkpoint.every_steps=2")
    with pytest.raises(ConfigError, match=r"student.depth: checkpoint has 2, this run has 3"):
        _run(out, demo_shards, "train.max_steps=4", "student.depth=3")


def test_final_weights_are_loadable_without_unpickling(tmp_path: Path, demo_shards: Path) -> None:
    out = tmp_path / "run"
    _run(out, demo_shards, "train.max_steps=2")
    state = torch.load(out / "checkpoints" / "step_000000002" / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.blocks.0.") for k in state)
    assert any(k.startswith("teacher_norms.mast3r_vitlarge_16.patch.") for k in state)


def test_corrupt_images_are_replaced_and_counted_in_metrics(tmp_path: Path) -> None:
    from dune_scale.data import write_synthetic_dataset

    shards = tmp_path / "shards"
    for name in ("synth_dino2", "synth_mast3r", "synth_multihmr"):
        bad = range(0, 48, 3) if name == "synth_mast3r" else ()
        write_synthetic_dataset(shards, name, 48, image_size=48, corrupt=bad)
    # A third of one domain's images is damaged: above data.max_corrupt_fraction's default (test_hardening).
    runs = [_run(tmp_path / f"run{i}", shards, "train.max_steps=6", "data.max_corrupt_fraction=0.5") for i in range(2)]
    counts = [sum(r["corrupt_samples"] for r in records) for records in runs]
    assert counts[0] > 0 and counts[0] == counts[1]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]  # same replacements both times


def test_stage_two_starts_from_the_exported_stage_one_weights(tmp_path: Path, demo_shards: Path) -> None:
    stage1 = tmp_path / "stage1"
    _run(stage1, demo_shards, "train.max_steps=2")
    weights = stage1 / "student.safetensors"
    records = _run(tmp_path / "stage2", demo_shards, "train.max_steps=2", "train.stage=2", "train.image_size=70",
                   f"student.pretrained={weights}")
    assert [r["step"] for r in records] == [1, 2]
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "stage2" / "student.safetensors"))
    assert exported["encoder.pos_embed"].shape == (1, 1 + 25, 48)  # resampled 4×4 → 5×5 grid


def test_metrics_are_mirrored_to_wandb_and_a_resume_continues_its_run(
    tmp_path: Path, demo_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    runs: list[dict] = []

    def init(**kwargs):
        run = {"init": kwargs, "logged": [], "finished": False}
        runs.append(run)
        return types.SimpleNamespace(
            log=lambda data, step: run["logged"].append((step, data)), finish=lambda: run.update(finished=True)
        )

    fake = types.ModuleType("wandb")
    fake.init = init
    fake.util = types.SimpleNamespace(generate_id=lambda: "run-abc")
    fake.__spec__ = types.SimpleNamespace(name="wandb")  # importlib.util.find_spec finds it
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    _run(out, demo_shards, "train.max_steps=2", "run.wandb_project=dune")
    _run(out, demo_shards, "train.max_steps=3", "run.wandb_project=dune")
    assert [r["init"]["id"] for r in runs] == ["run-abc", "run-abc"] and all(r["finished"] for r in runs)
    assert [step for step, _ in runs[0]["logged"] + runs[1]["logged"]] == [1, 2, 3]
    assert "loss" in runs[1]["logged"][0][1] and runs[0]["init"]["project"] == "dune"


def test_wandb_project_without_wandb_installed_is_named(tmp_path: Path, demo_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="run.wandb_project=dune needs the wandb package"):
        _run(tmp_path / "run", demo_shards, "train.max_steps=1", "run.wandb_project=dune")


def _poison_teacher(monkeypatch: pytest.MonkeyPatch, teacher: str, bad_calls: set[int]) -> None:
    """The teacher's patch features turn NaN on the given (1-based) forward calls."""
    from dune_scale.teachers.ensemble import TeacherEnsemble

    original, calls = TeacherEnsemble.forward, [0]

    def forward(self, images, *rest):
        outputs = original(self, images, *rest)
        calls[0] += 1
        if calls[0] in bad_calls:
            outputs[teacher]["patch"] = torch.full_like(outputs[teacher]["patch"], float("nan"))
        return outputs

    monkeypatch.setattr(TeacherEnsemble, "forward", forward)


def _checkpoint_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / (out / "checkpoints" / LATEST).read_text().strip() / "model.pt", weights_only=True)


def test_nonfinite_loss_stops_naming_step_and_teacher_and_saves_no_nan(
    tmp_path: Path, demo_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dune_scale.engine.nonfinite import NonFiniteError

    _poison_teacher(monkeypatch, "mast3r_vitlarge_16", {3})
    out = tmp_path / "run"
    # Logged every 2 steps: step 3 is found at the save of step 4 (checked before every save).
    with pytest.raises(NonFiniteError, match=r"step 3: the loss of teacher mast3r_vitlarge_16 is not finite"):
        _run(out, demo_shards, "train.max_steps=6", "checkpoint.every_steps=2", "run.log_every=4", "run.console=plain")
    assert (out / "checkpoints" / LATEST).read_text().strip() == "step_000000002"
    assert all(torch.isfinite(v).all() for v in _checkpoint_weights(out).values())


def test_nonfinite_skip_leaves_weights_and_moments_and_counts_consecutive_skips(
    tmp_path: Path, demo_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dune_scale.engine.nonfinite import NonFiniteError

    reference = _run(tmp_path / "clean", demo_shards, "train.max_steps=2")
    _poison_teacher(monkeypatch, "dino2reg_vitlarge_14", {3})
    out = tmp_path / "skip"
    records = _run(out, demo_shards, "train.max_steps=3", "train.nonfinite=skip", "run.console=plain")
    assert records[:2] == [{**r, "img_per_s": records[i]["img_per_s"]} for i, r in enumerate(reference)]
    assert records[2]["loss"] is None and records[2]["nonfinite_skips"] == 1 and records[1]["nonfinite_skips"] == 0
    # The skipped step changed nothing: weights, teacher-norm statistics and AdamW state are those of step 2.
    clean_weights = _checkpoint_weights(tmp_path / "clean")
    for key, value in _checkpoint_weights(out).items():
        assert torch.equal(value, clean_weights[key]), key

    def folder(run: Path) -> Path:
        return run / "checkpoints" / (run / "checkpoints" / LATEST).read_text().strip()

    skipped_optim = torch.load(folder(out) / "optimizer.pt", weights_only=True)["state"]
    clean_optim = torch.load(folder(tmp_path / "clean") / "optimizer.pt", weights_only=True)["state"]
    for index, state in clean_optim.items():
        for name, value in state.items():
            assert torch.equal(skipped_optim[index][name], value), (index, name)
    _poison_teacher(monkeypatch, "dino2reg_vitlarge_14", set(range(1, 100)))
    with pytest.raises(NonFiniteError, match=r"3 consecutive skipped updates, more than train.max_nonfinite_skips=2"):
        _run(tmp_path / "limit", demo_shards, "train.max_steps=5", "train.nonfinite=skip", "train.max_nonfinite_skips=2")


def test_refused_resumes_and_bad_output_dirs_are_one_line_with_exit_code_2(
    tmp_path: Path, demo_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    from dune_scale.cli.train import main

    out = tmp_path / "run"
    _run(out, demo_shards, "train.max_steps=2", "checkpoint.every_steps=1")
    config_before = (out / "config.yaml").read_text()
    for folder in (out / "checkpoints").glob("step_*"):
        (folder / TRAINER_STATE).write_bytes(b"x" * (folder / TRAINER_STATE).stat().st_size)
    argv = ["--config", str(TINY_CPU), *tiny_overrides(out, demo_shards, "train.max_steps=4", "train.nonfinite=skip")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "none can be resumed from" in err and "content differs from its sha256" in err and "Traceback" not in err
    assert (out / "config.yaml").read_text() == config_before  # the refused run did not replace it
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]  # nor truncated the metrics
    assert main([*argv, f"checkpoint.resume={tmp_path / 'missing'}"]) == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["--config", str(TINY_CPU), *tiny_overrides(tmp_path / "a_file", demo_shards)]) == 2
    assert "run.output_dir: " in capsys.readouterr().err
    # checkpoint.resume=never starts over deliberately.
    assert main([*argv, "checkpoint.resume=never"]) == 0
    assert "nonfinite: skip" in (out / "config.yaml").read_text()
