"""The weighted k-NN probe: exact votes on hand-made features, and a trained tiny student beats a random one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import TINY_CPU, tiny_overrides
from dune_scale.cli.train import train
from dune_scale.config import load_config
from dune_scale.engine.compose import build_encoder
from dune_scale.eval.knn import knn_probe, weighted_knn
from dune_scale.telemetry.metrics import read_metrics

# Class = background colour (with jitter) under random coloured discs.
CLASS_COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40))


def class_token(encoder: torch.nn.Module):
    """The k-NN feature of an encoder: its final-normed class token."""
    return lambda images: encoder.forward_features(images)["cls"]


def write_labelled_set(folder: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label, colour in enumerate(CLASS_COLOURS):
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = (np.array(colour) + rng.normal(0, 25, 3)).clip(0, 255).astype(int)
            image = Image.new("RGB", (64, 64), tuple(background.tolist()))
            draw = ImageDraw.Draw(image)
            for _ in range(3):
                x, y = rng.uniform(0, 48, 2)
                draw.ellipse([x, y, x + 16, y + 16], fill=tuple(rng.integers(0, 256, 3).tolist()))
            image.save(folder / f"class_{label}" / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("labelled")
    return write_labelled_set(root / "train", 16, seed=1), write_labelled_set(root / "val", 8, seed=2)


def _unit(degrees: list[float]) -> torch.Tensor:
    angles = torch.tensor(degrees) * torch.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_votes_are_weighted_by_exp_similarity_over_temperature() -> None:
    # Around the query (angle 0): one class-0 image at cos 0.99, two class-1 images at cos 0.90,
    # one class-2 image far away. With k=3 a majority vote says class 1; DINO's exp(sim/0.07)
    # weights make the single closest class-0 neighbour win (e^14.1 > 2·e^12.9).
    train = _unit([8.11, 25.84, -25.84, 90.0])
    labels = torch.tensor([0, 1, 1, 2])
    query, truth = _unit([0.0]), torch.tensor([0])
    assert weighted_knn(train, labels, query, truth, num_classes=3, k=3, temperature=0.07) == (1.0, 1.0)
    top1, top5 = weighted_knn(train, labels, query, truth, num_classes=3, k=3, temperature=100.0)
    assert (top1, top5) == (0.0, 1.0)  # nearly uniform weights: the majority wins; class 0 is second


def test_trained_student_beats_random_and_knn_rises_during_training(
    tmp_path: Path, demo_shards: Path, labelled: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    train_dir, val_dir = labelled
    out = tmp_path / "run"
    cfg = load_config(TINY_CPU, tiny_overrides(out, demo_shards, "train.max_steps=12", "eval.knn_every_steps=6",
                                               f"eval.knn_train={train_dir}", f"eval.knn_val={val_dir}"))
    train(cfg)
    knn = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "knn"]
    assert [(r["step"], r["dataset"], r["k"], r["temperature"]) for r in knn] == [(6, "val", 20, 0.07), (12, "val", 20, 0.07)]
    torch.manual_seed(cfg.run.seed)
    random_student = build_encoder(cfg).eval()
    chance = 1 / len(CLASS_COLOURS)
    baseline = knn_probe(class_token(random_student), train_dir, val_dir, 56, torch.device("cpu"))
    assert baseline.val_images == 32 and baseline.train_images == 64
    # Rises from the untrained student (step 0) and stays well above chance.
    for record in knn:
        assert record["top1"] > max(baseline.top1 + 0.25, chance + 0.4), (knn, baseline)

    # The program on the finished run folder gives the in-training number of the final step.
    from dune_scale.cli.eval import main

    capsys.readouterr()
    assert main(["knn", "--checkpoint", str(out), "--train", str(train_dir), "--val", str(val_dir)]) == 0
    printed = capsys.readouterr().out
    match = re.search(r"top1 ([0-9.]+) top5 ([0-9.]+)", printed)
    assert match and float(match[1]) == pytest.approx(knn[-1]["top1"], abs=1e-4), printed
    assert float(match[2]) == pytest.approx(knn[-1]["top5"], abs=1e-4)


def test_eval_program_names_bad_inputs(tmp_path: Path, labelled: tuple[Path, Path]) -> None:
    from dune_scale.cli.eval import main

    train_dir, val_dir = labelled
    assert main(["knn", "--checkpoint", str(tmp_path / "missing"), "--train", str(train_dir), "--val", str(val_dir)]) == 2
    assert main(["knn", "--checkpoint", str(tmp_path), "--train", str(tmp_path / "nope"), "--val", str(val_dir)]) == 2
    (tmp_path / "config.yaml").write_text("{}\n")
    assert main(["knn", "--checkpoint", str(tmp_path), "--train", str(train_dir), "--val", str(val_dir)]) == 2


def test_mds_shards_with_labels_give_the_imagefolder_result(tmp_path: Path, labelled: tuple[Path, Path]) -> None:
    """Shards of convert_data.py --labels folders (``image`` + ``label``) and of earlier versions
    (``jpeg`` + ``label``) read as the folders they came from; shards without labels are named."""
    from streaming import MDSWriter

    from dune_scale.cli.convert_data import main as convert
    from dune_scale.eval.probe_data import ProbeDataError

    def old_shards(folder: Path) -> Path:
        out = tmp_path / f"{folder.name}_jpeg"
        with MDSWriter(out=str(out), columns={"jpeg": "bytes", "label": "int"}) as writer:
            for label, class_dir in enumerate(sorted(folder.iterdir())):
                for image in sorted(class_dir.iterdir()):
                    writer.write({"jpeg": image.read_bytes(), "label": label})
        return out

    def converted(folder: Path, *extra: str) -> Path:
        assert convert([str(folder), str(tmp_path / "mds"), "--name", folder.name, "--workers", "1", "--no-progress", *extra]) == 0
        return tmp_path / "mds" / folder.name

    train_dir, val_dir = labelled
    torch.manual_seed(0)
    encoder = build_encoder(load_config(TINY_CPU, ["data.remote_root=/nonexistent", "data.mixture=in1k"])).eval()
    from_folders = knn_probe(class_token(encoder), train_dir, val_dir, 56, torch.device("cpu"), k=5)
    for shards in ((old_shards(train_dir), old_shards(val_dir)),
                   (converted(train_dir, "--labels", "folders"), converted(val_dir, "--labels", "folders"))):
        from_shards = knn_probe(class_token(encoder), *shards, 56, torch.device("cpu"), k=5)
        assert (from_shards.top1, from_shards.top5, from_shards.val_images) == (from_folders.top1, from_folders.top5, 32)
    assert json.loads((tmp_path / "mds" / "val" / "convert_report.json").read_text())["classes"] == [f"class_{i}" for i in range(4)]
    unlabelled = converted(train_dir)  # again without --labels: converted anew, no label column
    with pytest.raises(ProbeDataError, match="hold no 'label' column; convert the class folders with .*--labels folders"):
        knn_probe(class_token(encoder), unlabelled, val_dir, 56, torch.device("cpu"))


def test_an_unreadable_image_is_skipped_and_counted(tmp_path: Path, labelled: tuple[Path, Path]) -> None:
    import shutil

    train_dir, val_dir = labelled
    broken = Path(shutil.copytree(val_dir, tmp_path / "val"))
    (broken / "class_1" / "3.png").write_bytes(b"\x89PNG truncated")
    torch.manual_seed(0)
    cfg = load_config(TINY_CPU, ["data.remote_root=/nonexistent", "data.mixture=in1k"])
    encoder = build_encoder(cfg).eval()
    result = knn_probe(class_token(encoder), train_dir, broken, 56, torch.device("cpu"))
    assert (result.val_images, [item.path for item in result.skipped]) == (31, [str(broken / "class_1" / "3.png")])
    assert "cannot decode image" in result.skipped[0].reason
