"""Held-out validation during training: per-dataset, per-teacher records that resume exactly."""

from __future__ import annotations

import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CPU, tiny_overrides
from dune_scale.cli.train import train
from dune_scale.config import ConfigError, load_config
from dune_scale.data.synthetic import DEMO_DATASETS, synthetic_image
from dune_scale.data.transforms import build_val_transform
from dune_scale.telemetry.metrics import read_metrics

TEACHERS = ["dino2reg_vitlarge_14", "mast3r_vitlarge_16", "multihmr_vitlarge_14_672"]
NAMES = [name for name, _ in DEMO_DATASETS]


def val_batches(name: str, count: int, batch_size: int = 6, image_size: int = 56, seed: int = 7) -> list[dict]:
    """Held-out images of one dataset as training-style batches (a list is re-iterable)."""
    rng = np.random.default_rng([seed, NAMES.index(name)])
    transform = build_val_transform(image_size)
    images = [transform(torch.from_numpy(np.array(synthetic_image(rng, 64))).permute(2, 0, 1)) for _ in range(count)]
    return [
        {"images": torch.stack(images[i : i + batch_size]), "dataset": [name] * len(images[i : i + batch_size]),
         "index": torch.arange(i, i + len(images[i : i + batch_size]))}
        for i in range(0, count, batch_size)
    ]


def val_sets(count: int = 12) -> tuple[list[str], list[list[dict]]]:
    return NAMES, [val_batches(name, count) for name in NAMES]


def _run(output: Path, shards: Path, *extra: str, val=None, feature_pictures=None) -> list[dict]:
    train(load_config(TINY_CPU, tiny_overrides(output, shards, *extra)), val=val or val_sets(), feature_pictures=feature_pictures)
    return read_metrics(output / "metrics.jsonl")


def _val(records: list[dict], timed: bool = True) -> list[dict]:
    """The validation records (without their wall time, which differs between runs, unless ``timed``)."""
    return [r if timed else {k: v for k, v in r.items() if k != "seconds"} for r in records if r["kind"] == "val"]


def test_validation_records_per_dataset_and_teacher_and_losses_fall(tmp_path: Path, demo_shards: Path) -> None:
    records = _run(tmp_path / "run", demo_shards, "train.max_steps=16", "eval.every_steps=8", "run.log_every=4")
    val = _val(records)
    assert [(r["step"], r["dataset"]) for r in val] == [(s, d) for s in (8, 16) for d in [*NAMES, "all"]]
    for record in val:
        assert record["images"] == (36 if record["dataset"] == "all" else 12)
        for teacher in TEACHERS:
            parts = record[f"loss_{teacher}_cos"] + record[f"loss_{teacher}_sl1"]
            assert record[f"loss_{teacher}"] == pytest.approx(parts, rel=1e-6)
        # Token types averaged: DINOv2 is distilled on cls and patch tokens, the others on patches only.
        dino = [record[f"loss_dino2reg_vitlarge_14_{token}"] for token in ("cls", "patch")]
        assert record["loss_dino2reg_vitlarge_14"] == pytest.approx(sum(dino) / 2, rel=1e-6) and min(dino) > 0
        for teacher in TEACHERS[1:]:
            assert record[f"loss_{teacher}"] == pytest.approx(record[f"loss_{teacher}_patch"], rel=1e-6)
            assert record.get(f"loss_{teacher}_cls") is None
        assert record["loss"] == pytest.approx(sum(record[f"loss_{t}"] for t in TEACHERS) / 3, rel=1e-6)
    assert val[3]["dataset"] == "all" and 0 < val[3]["seconds"] < 60
    # Held-out loss falls with training, for every dataset (step 16 vs step 8), and the first is far
    # from the untrained student's loss level of the training records.
    for before, after in zip(val[:4], val[4:]):
        assert after["loss"] < before["loss"], (before["dataset"], before["loss"], after["loss"])
    assert [r["step"] for r in records if r["kind"] == "train"] == [4, 8, 12, 16]


def test_resume_mid_run_gives_the_same_validation_numbers(tmp_path: Path, demo_shards: Path) -> None:
    common = ("train.max_steps=8", "checkpoint.every_steps=3", "eval.every_steps=4")
    straight = _run(tmp_path / "straight", demo_shards, *common)
    out = tmp_path / "resumed"
    _run(out, demo_shards, "train.max_steps=5", *common[1:])  # stops (and saves) at step 5
    resumed = _run(out, demo_shards, *common)
    # The first part ended at its max_steps=5, so it validated there too ("at the end").
    assert [r["step"] for r in _val(resumed) if r["dataset"] == "all"] == [4, 5, 8]
    assert [r for r in _val(resumed, timed=False) if r["step"] != 5] == _val(straight, timed=False)
    assert [r["loss"] for r in resumed if r["kind"] == "train"] == [r["loss"] for r in straight if r["kind"] == "train"]


def test_validation_and_probes_do_not_change_training(tmp_path: Path, demo_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation and the probes of eval.probes (issue 26) leave the training bitwise as it was; a
    kind added in one file (tests/toy_eval_kind.py) and registered runs there like the others."""
    from safetensors.torch import load_file
    from test_probes import write_ade20k, write_nyu
    from toy_eval_kind import TOY, ToyOptions, expected_cls0

    from dune_scale.eval.registry import EVAL_KINDS

    monkeypatch.setitem(EVAL_KINDS, TOY.name, TOY)  # the one registration
    ade, nyu = write_ade20k(tmp_path / "ade", (6, 3)), write_nyu(tmp_path / "nyu", (6, 3))
    probes = (f"eval.probes=[{{kind: linear-seg, data: {ade}, num_classes: 3, epochs: 2}}, "
              f"{{kind: depth, data: {nyu}, epochs: 2, features: 'projector:dino2reg_vitlarge_14'}}, {{kind: toy, images: 3}}]")
    plain = _run(tmp_path / "plain", demo_shards, "train.max_steps=6", "distill.teacher_drop=lowest_loss")
    streams = [(torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())]  # training seeds them itself
    with_val = _run(tmp_path / "val", demo_shards, "train.max_steps=6", "distill.teacher_drop=lowest_loss",
                    "eval.every_steps=2", probes, "eval.probe_every_steps=4")
    streams.append((torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()))
    assert [r["loss"] for r in with_val if r["kind"] == "train"] == [r["loss"] for r in plain]
    assert torch.equal(streams[0][0], streams[1][0]) and np.array_equal(streams[0][1], streams[1][1])
    assert streams[0][2] == streams[1][2]
    weights = [load_file(str(tmp_path / run / "student.safetensors")) for run in ("plain", "val")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    # The probes ran after step 4 and at the end, into the same records as validation.
    seg = [r for r in with_val if r["kind"] == "linear-seg"]
    depth = [r for r in with_val if r["kind"] == "depth"]
    assert [r["step"] for r in seg] == [r["step"] for r in depth] == [4, 6]
    assert seg[0]["dataset"] == "ade" and (seg[0]["images"], seg[0]["train_images"], seg[0]["skipped"]) == (3, 6, 0)
    assert 0 <= seg[-1]["miou"] <= 1 and 0 <= seg[-1]["pixel_accuracy"] <= 1
    assert depth[0]["dataset"] == "nyu.projector:dino2reg_vitlarge_14" and depth[-1]["rmse"] > 0
    toy = [r for r in with_val if r["kind"] == "toy"]
    assert [(r["step"], r["dataset"], r["images"]) for r in toy] == [(4, "noise3", 3), (6, "noise3", 3)]
    assert toy[-1]["cls0"] == pytest.approx(expected_cls0(tmp_path / "val", ToyOptions(images=3)), rel=1e-5)  # the final student's
    assert toy[0]["cls0"] != toy[-1]["cls0"]  # the student trained in between


def test_feature_pictures_are_written_as_png_at_each_validation(tmp_path: Path, demo_shards: Path) -> None:
    seen = []

    def pictures(encoder: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
        seen.append(images.shape)
        patch = encoder.forward_features(images)["patch"]  # (B, N, D) → first three channels as RGB
        side = int(patch.shape[1] ** 0.5)
        rgb = patch[..., :3].reshape(len(images), side, side, 3)
        rgb = (rgb - rgb.amin()) / (rgb.amax() - rgb.amin() + 1e-6)
        return (rgb * 255).byte().numpy()

    out = tmp_path / "run"
    records = _run(out, demo_shards, "train.max_steps=4", "eval.every_steps=2", feature_pictures=pictures)
    written = sorted(p.name for p in (out / "pictures").glob("*.png"))
    assert written == [f"step_{s:09d}_{i}.png" for s in (2, 4) for i in range(4)]
    assert seen == [torch.Size([4, 3, 56, 56])] * 2
    named = [r for r in records if r["kind"] == "pictures"]  # image-aware sinks (TensorBoard, W&B) show them
    assert [r["step"] for r in named] == [2, 4] and named[0]["paths"][0] == "pictures/step_000000002_0.png"


def test_validation_groups_samples_by_their_dataset_whatever_the_loaders() -> None:
    from dune_scale.eval.validation import Validator

    torch.manual_seed(0)
    student, teachers, objective = _tiny_models()
    strategy = types.SimpleNamespace(module=student, forward=student, autocast=lambda: torch.autocast("cpu", enabled=False))
    names, per_dataset = val_sets(count=6)
    mixed = [{"images": torch.cat([b["images"] for b in batches]), "dataset": [n for b in batches for n in b["dataset"]]}
             for batches in zip(*[val_batches(n, 6, batch_size=3) for n in names])]
    by_dataset = Validator(per_dataset, names, teachers, torch.device("cpu")).run({"": (strategy, objective)}, 1, 1)[""]
    rng_before = torch.get_rng_state()
    one_loader = Validator([mixed], names, teachers, torch.device("cpu")).run({"": (strategy, objective)}, 1, 1)[""]
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert student.training  # back in training mode
    for a, b in zip(by_dataset, one_loader):
        assert a["dataset"] == b["dataset"] and a["images"] == b["images"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # A stop signal abandons the validation at once: nothing to record, training state untouched.
    stopped = Validator(per_dataset, names, teachers, torch.device("cpu")).run({"": (strategy, objective)}, 1, 1, lambda: True)
    assert stopped == {"": []}


def _tiny_models() -> tuple[torch.nn.Module, torch.nn.Module, object]:
    from dune_scale.engine.compose import build_objective, build_student
    from dune_scale.teachers import build_teacher_ensemble

    cfg = load_config(TINY_CPU, ["data.remote_root=/nonexistent", "data.mixture=in1k"])
    teachers = build_teacher_ensemble(cfg.teachers.models, cfg.student.patch_size, torch.device("cpu"), torch.float32)
    student = build_student(cfg, teachers.embed_dims, teachers.tokens)
    return student, teachers, build_objective(cfg, list(teachers.tokens), world_size=1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.every_steps=0", "eval.every_steps: 0 is not allowed"),
        ("eval.knn_every_steps=5", "it needs eval.knn_train and eval.knn_val"),
        ("eval.knn_temperature=0", "eval.knn_temperature"),
        ("run.profile_steps=5:2", "run.profile_steps: '5:2' is not allowed"),
        ("run.profile_steps=abc", "give A:B"),
    ],
)
def test_bad_eval_settings_are_named(override: str, message: str, demo_shards: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_CPU, [f"data.remote_root={demo_shards}", override])


def test_every_steps_validates_the_mixtures_val_splits_by_default(tmp_path: Path, demo_shards: Path) -> None:
    """launch/train.py connects <remote_root>/<name>/val of every dataset with a val_size, and the
    PCA pictures; a trainer assembled without validation data is refused instead of skipping it."""
    from dune_scale.distributed import DistInfo
    from dune_scale.engine.compose import build_trainer, check_run

    out = tmp_path / "run"
    cfg = load_config(TINY_CPU, tiny_overrides(out, demo_shards, "train.max_steps=1", "eval.every_steps=1", "eval.max_batches=1"))
    train(cfg)
    records = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "val"]
    assert sorted(r["dataset"] for r in records) == ["all", "synth_dino2", "synth_mast3r", "synth_multihmr"]
    assert all(r["images"] == 12 for r in records if r["dataset"] != "all")
    assert any((out / "pictures").glob("step_000000001_*.png"))
    with pytest.raises(ConfigError, match="no validation data"):
        build_trainer(cfg, DistInfo(), check_run(cfg, DistInfo()), loader=None)


def test_training_records_carry_the_loss_split_drop_weights_grad_norms_and_norm_stats(tmp_path: Path, demo_shards: Path) -> None:
    from safetensors.torch import load_file

    records = _run(tmp_path / "run", demo_shards, "train.max_steps=4", "run.log_every=2")
    assert [r["step"] for r in records] == [2, 4] and all(r["loss_dino2reg_vitlarge_14_cls"] > 0 for r in records)
    record = _run(tmp_path / "every", demo_shards, "train.max_steps=2")[-1]  # one step per record
    # The teacher-norm summaries are the channel means of the running statistics the student ends with.
    norms = load_file(str(tmp_path / "every" / "student.safetensors"))
    for teacher in TEACHERS:
        assert record[f"loss_{teacher}_cos"] > 0 and record[f"loss_{teacher}_sl1"] > 0 and record[f"loss_{teacher}_patch"] > 0
        for stat in ("mean", "std"):
            saved = norms[f"teacher_norms.{teacher}.patch.running_{stat}"].mean().item()
            assert record[f"norm_{teacher}_patch_{stat}"] == pytest.approx(saved, rel=1e-6, abs=1e-9)
        assert record[f"norm_{teacher}_patch_std"] != pytest.approx(1.0)  # moved off its initial value
    assert sum(record[f"drop_weight_{t}"] for t in TEACHERS) == pytest.approx(1.0, rel=1e-5)
    groups = ["encoder", *(f"projector_{t}" for t in TEACHERS)]
    norms = [record[f"grad_norm_{g}"] for g in groups]
    assert all(n > 0 for n in norms)
    # The groups partition the student's trainable parameters: their norms make up the global one.
    assert sum(n * n for n in norms) ** 0.5 == pytest.approx(record["grad_norm"], rel=1e-4)
    # With teacher dropping off, the split recombines into the logged per-teacher loss of that step.
    plain = _run(tmp_path / "plain", demo_shards, "train.max_steps=1", "distill.teacher_drop=none")[-1]
    for teacher in TEACHERS:
        parts = plain[f"loss_{teacher}_cos"] + plain[f"loss_{teacher}_sl1"]
        assert parts == pytest.approx(plain[f"loss_{teacher}"], rel=1e-5)
    assert all(plain[f"drop_weight_{t}"] == pytest.approx(1 / 3) for t in TEACHERS)


# Two ranks validating (each its share of val_sets()) like one, with per-group gradient norms and the
# k-NN probe: test_distributed's strategy runs (tests/workers/train_with_val.py).


class SignalledDuringIteration:
    """A validation loader that delivers SIGTERM to this process while its second batch is read."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self.signalled = False

    def __iter__(self):
        import os
        import signal

        for i, batch in enumerate(self.batches):
            if i == 1 and not self.signalled:
                self.signalled = True
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def test_a_stop_signal_during_validation_abandons_it_and_saves_the_training_state(tmp_path: Path, demo_shards: Path) -> None:
    common = ("train.max_steps=6", "eval.every_steps=3", "checkpoint.every_steps=100")
    straight = _run(tmp_path / "straight", demo_shards, *common)
    out = tmp_path / "preempted"
    names, loaders = val_sets()
    interrupted = SignalledDuringIteration(loaders[0])
    cfg = load_config(TINY_CPU, tiny_overrides(out, demo_shards, *common))
    assert train(cfg, val=(names, [interrupted, *loaders[1:]])) is False  # stopped early, after saving
    assert interrupted.signalled and (out / "checkpoints" / "latest").read_text().strip() == "step_000000003"
    assert [r["kind"] for r in read_metrics(out / "metrics.jsonl")] == ["train"] * 3  # validation abandoned
    resumed = _run(out, demo_shards, *common)
    assert [r["loss"] for r in resumed if r["kind"] == "train"] == [r["loss"] for r in straight if r["kind"] == "train"]
    assert _val(resumed, timed=False) == [r for r in _val(straight, timed=False) if r["step"] == 6]


@pytest.mark.distributed
def test_ranks_with_uneven_validation_batches_stay_in_lockstep_and_stop_together(tmp_path: Path) -> None:
    import json
    import subprocess

    from conftest import REPO, launch_command, launcher_env

    command = launch_command("torchrun", 2, REPO / "tests" / "workers" / "lockstep.py", str(tmp_path))
    result = subprocess.run(command, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["uneven"] == [0, 1, 2, 0, 1, 2, 3]  # the shorter rank's count of each loader
        assert rank["capped"] == [0, 1, 0, 1]
        assert rank["seen"] == [0, 1] and rank["abandoned"]  # rank 1 was asked to stop before its third batch
