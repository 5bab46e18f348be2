"""The probes on frozen features (linear segmentation, depth; issue 26): tiny ADE20K- and NYU-layout
sets whose answer the features hold (colour-coded classes, brightness-coded depth, in blocks of one
patch), a student and a teacher each probed with one command, the results table and model card, the
bad-input rules, and the probes during training leaving the training bitwise unchanged."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CPU
from dune_scale.config import load_config, save_config

# Class c (1..3) paints its blocks this colour; 0 ("other", ignored) is grey.
CLASS_COLOURS = {0: (128, 128, 128), 1: (220, 30, 30), 2: (30, 220, 30), 3: (30, 30, 220)}
BLOCKS = 4  # a 4×4 grid of blocks: at the probe's 56 px each block is one 14-px patch
SIDE = 84  # written size: resized to 56 for the probe


def _blocks(rng: np.random.Generator, values: np.ndarray) -> np.ndarray:
    """A (BLOCKS, BLOCKS, ...) array blown up to SIDE × SIDE."""
    return np.kron(values, np.ones((SIDE // BLOCKS, SIDE // BLOCKS) + (1,) * (values.ndim - 2), dtype=values.dtype))


def write_ade20k(root: Path, per_split: tuple[int, int] = (24, 12), seed: int = 0) -> Path:
    """ADE20K layout: images/{training,validation}/*.jpg, annotations/…/*.png (0 = ignore, 1..3)."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("training", "validation"), per_split):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            classes = rng.choice(4, size=(BLOCKS, BLOCKS), p=[0.1, 0.3, 0.3, 0.3])
            colours = np.array([CLASS_COLOURS[c] for c in classes.flat], dtype=np.float64).reshape(BLOCKS, BLOCKS, 3)
            colours = (colours + rng.normal(0, 12, colours.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(_blocks(rng, colours)).save(root / "images" / split / f"ADE_{i:04d}.jpg", quality=95)
            Image.fromarray(_blocks(rng, classes.astype(np.uint8))).save(root / "annotations" / split / f"ADE_{i:04d}.png")
    return root


def write_nyu(root: Path, per_split: tuple[int, int] = (24, 12), seed: int = 0) -> Path:
    """NYU layout: {train,test}/NAME.jpg + NAME.png (uint16 mm); brighter blocks are farther away."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_split):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            brightness = rng.uniform(0.1, 0.9, size=(BLOCKS, BLOCKS))
            grey = np.repeat((brightness * 255).astype(np.uint8)[..., None], 3, axis=2)
            depth_mm = (1000 + 8000 * brightness).astype(np.uint16)
            depth_mm[0, 0] = 0  # one block without measurement
            Image.fromarray(_blocks(rng, grey)).save(root / split / f"{i:04d}.jpg", quality=95)
            Image.fromarray(_blocks(rng, depth_mm)).save(root / split / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def ade20k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ade20k(tmp_path_factory.mktemp("probe_data") / "ade_tiny")


@pytest.fixture(scope="module")
def nyu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nyu(tmp_path_factory.mktemp("probe_data") / "nyu_tiny")


@pytest.fixture(scope="module")
def student_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding a random tiny student (config.yaml + student.safetensors)."""
    from safetensors.torch import save_file

    from dune_scale.engine.compose import build_student
    from dune_scale.teachers import build_teacher_ensemble

    run = tmp_path_factory.mktemp("student_run")
    cfg = load_config(TINY_CPU, ["data.remote_root=/nonexistent", "data.mixture=in1k", f"run.output_dir={run}"])
    torch.manual_seed(0)
    teachers = build_teacher_ensemble(cfg.teachers.models, cfg.student.patch_size, torch.device("cpu"), torch.float32)
    student = build_student(cfg, teachers.embed_dims, teachers.tokens)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(run / "student.safetensors"))
    save_config(cfg, run / "config.yaml")
    return run


def _eval(*argv: str) -> int:
    from dune_scale.cli.eval import main

    return main([*argv, "--workers", "0", "--no-progress"])


def _printed(capsys: pytest.CaptureFixture) -> dict[str, float]:
    line = capsys.readouterr().out.splitlines()[0]
    return {key: float(value) for key, value in re.findall(r"([a-z_0-9]+) ([0-9.]+)(?= |\()", line)}


def test_segmentation_and_depth_probes_beat_chance_for_a_student_and_a_teacher(
    student_run: Path, ade20k: Path, nyu: Path, capsys: pytest.CaptureFixture
) -> None:
    seg = ("linear-seg", "--data", str(ade20k), "--num-classes", "3", "--epochs", "30", "--lr", "0.01")
    assert _eval(*seg, "--checkpoint", str(student_run)) == 0
    student_seg = _printed(capsys)
    assert _eval(*seg, "--teacher", "dino2reg_vitlarge_14", "--config", str(student_run)) == 0
    teacher_seg = _printed(capsys)
    depth = ("depth", "--data", str(nyu), "--epochs", "30", "--lr", "0.01")
    assert _eval(*depth, "--checkpoint", str(student_run)) == 0
    student_depth = _printed(capsys)
    # Chance: three equally frequent classes (mIoU ≈ 0.2, pixel accuracy 1/3); depth from the mean
    # (δ<1.25 ≈ 0.3 for depths uniform on 1–9 m).
    for found in (student_seg, teacher_seg):
        assert found["miou"] > 0.6 and found["pixel_accuracy"] > 0.75, found
    assert student_depth["delta1"] > 0.6 and student_depth["abs_rel"] < 0.25, student_depth

    # One JSON per probe in RUN/eval (the teacher's too: --config named this run), with what ran.
    results = {path.name: json.loads(path.read_text()) for path in (student_run / "eval").glob("*.json")}
    assert sorted(results) == ["depth_nyu_tiny_student_encoder.json", "linear-seg_ade_tiny_dino2reg_vitlarge_14_encoder.json",
                               "linear-seg_ade_tiny_student_encoder.json"]
    record = results["linear-seg_ade_tiny_student_encoder.json"]
    assert record["metrics"]["miou"] == pytest.approx(student_seg["miou"], abs=1e-4)
    assert (record["images"], record["skipped_count"], record["seed"], record["image_size"]) == ({"train": 24, "val": 12}, 0, 0, 56)
    assert record["options"]["num_classes"] == 3 and record["options"]["data"] == str(ade20k)
    from dune_scale.engine.export import model_card, read_student, sha256_file

    assert record["source"] == {"kind": "student", "name": "student", "path": str(student_run / "student.safetensors"),
                                "sha256": sha256_file(student_run / "student.safetensors"), "step": None}
    teacher = results["linear-seg_ade_tiny_dino2reg_vitlarge_14_encoder.json"]["source"]
    assert (teacher["kind"], teacher["path"], teacher["sha256"]) == ("teacher", "random init", None)

    # The report: the student's row above the teacher's, one column per metric, values as printed.
    assert _eval_report(student_run) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == ("| model | features | linear-seg ade_tiny mIoU ↑ | linear-seg ade_tiny pixel acc. ↑ | depth nyu_tiny RMSE (m) ↓ "
                        "| depth nyu_tiny AbsRel ↓ | depth nyu_tiny δ<1.25 ↑ |")
    assert table[2].startswith(f"| student | encoder | {100 * student_seg['miou']:.1f} | ")
    assert table[3] == (f"| dino2reg_vitlarge_14 (teacher) | encoder | {100 * teacher_seg['miou']:.1f} | "
                        f"{100 * teacher_seg['pixel_accuracy']:.1f} | – | – | – |")
    # The exported model card carries the same table.
    card = model_card(read_student(student_run))
    assert "\n".join(table) in card and "## Probes on frozen features" in card


def _eval_report(run: Path) -> int:
    from dune_scale.cli.eval import main

    return main(["report", str(run)])


def test_projector_features_and_a_fixed_seed(student_run: Path, ade20k: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--features projector:NAME`` probes what a projector predicts; a seed fixes the head."""
    seg = ("linear-seg", "--data", str(ade20k), "--num-classes", "3", "--epochs", "3", "--checkpoint", str(student_run),
           "--out", str(tmp_path))
    runs = []
    for features, seed in (("projector:dino2reg_vitlarge_14", "1"), ("projector:dino2reg_vitlarge_14", "1"), ("encoder", "1")):
        assert _eval(*seg, "--features", features, "--seed", seed) == 0
        runs.append(_printed(capsys))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    record = json.loads((tmp_path / "linear-seg_ade_tiny_student_projector-dino2reg_vitlarge_14.json").read_text())
    assert record["features"] == "projector:dino2reg_vitlarge_14" and record["seed"] == 1
    assert not (student_run / "eval" / "linear-seg_ade_tiny_student_projector-dino2reg_vitlarge_14.json").exists()  # --out


def test_a_toy_eval_kind_added_in_one_file_runs_through_the_program_and_the_report(
    student_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """tests/toy_eval_kind.py plus one registration: ``launch/eval.py toy`` takes its options as
    flags (named when bad), prints and records the value its weights give, and the report shows it."""
    from toy_eval_kind import TOY, ToyOptions, expected_cls0

    from dune_scale.eval.registry import EVAL_KINDS

    monkeypatch.setitem(EVAL_KINDS, TOY.name, TOY)  # the one registration
    run = tmp_path / "run"  # the student alone, without the results other tests wrote beside it
    run.mkdir()
    for name in ("config.yaml", "student.safetensors"):
        (run / name).write_bytes((student_run / name).read_bytes())
    expected = expected_cls0(run, ToyOptions(images=3, offset=0.5))
    assert _eval("toy", "--checkpoint", str(run), "--images", "3", "--offset", "0.5") == 0
    printed = re.match(r"toy cls0 (-?[0-9.]+) \(0 train / 3 val images", capsys.readouterr().out)
    assert printed and float(printed[1]) == pytest.approx(expected, abs=1e-4)  # printed to 4 decimals
    record = json.loads((run / "eval" / "toy_noise3_student_encoder.json").read_text())
    assert record["metrics"] == {"cls0": pytest.approx(expected, rel=1e-5)}
    assert (record["options"], record["images"], record["dataset"]) == ({"images": 3, "offset": 0.5}, {"train": 0, "val": 3}, "noise3")
    assert _eval_report(run) == 0
    assert capsys.readouterr().out.splitlines() == ["| model | features | toy noise3 cls[0] mean ↑ |", "|---|---|---|",
                                                    f"| student | encoder | {expected:.3f} |"]
    assert _eval("toy", "--checkpoint", str(run), "--images", "0") == 2
    assert capsys.readouterr().err == "error: --images: 0 is not allowed; it must be at least 1\n"


def _copy(tree: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tree, to))


def test_a_file_at_fault_is_skipped_and_named(tmp_path: Path, student_run: Path, capsys: pytest.CaptureFixture) -> None:
    ade = write_ade20k(tmp_path / "ade", per_split=(6, 3))
    Image.new("L", (40, 40)).save(ade / "annotations" / "training" / "ADE_0001.png")  # another size than its image
    (ade / "images" / "validation" / "ADE_0002.jpg").write_bytes(b"not a jpeg")
    (ade / "annotations" / "training" / "ADE_0003.png").unlink()
    nyu = write_nyu(tmp_path / "nyu", per_split=(6, 3))
    Image.new("L", (SIDE, SIDE)).save(nyu / "train" / "0002.png")  # 8-bit: not millimetres
    out = tmp_path / "out"
    common = ("--checkpoint", str(student_run), "--epochs", "1", "--out", str(out))
    assert _eval("linear-seg", "--data", str(ade), "--num-classes", "3", *common) == 0
    assert _eval("depth", "--data", str(nyu), *common) == 0
    printed = capsys.readouterr().out
    seg = json.loads((out / "linear-seg_ade_student_encoder.json").read_text())
    assert (seg["images"], seg["skipped_count"]) == ({"train": 4, "val": 2}, 3)
    reasons = {Path(item["path"]).name: item["reason"] for item in seg["skipped"]}
    assert reasons["ADE_0001.png"] == "size 40x40 differs from its image's 84x84"
    assert reasons["ADE_0002.jpg"].startswith("cannot read the image")
    assert reasons["ADE_0003.jpg"] == "no label file ADE_0003.png beside it"
    assert f"skipped {ade / 'annotations' / 'training' / 'ADE_0001.png'}: size 40x40" in printed
    depth = json.loads((out / "depth_nyu_student_encoder.json").read_text())
    assert depth["skipped"] == [{"path": str(nyu / "train" / "0002.png"), "reason": "depth must be a uint16 PNG of millimetres, found mode L"}]
    assert depth["images"] == {"train": 5, "val": 3}


def test_what_makes_every_number_wrong_stops_with_one_message(
    tmp_path: Path, student_run: Path, ade20k: Path, nyu: Path, capsys: pytest.CaptureFixture
) -> None:
    seg = ("linear-seg", "--checkpoint", str(student_run), "--epochs", "1", "--out", str(tmp_path / "out"))
    cases = [
        ((*seg, "--data", str(ade20k), "--num-classes", "2"), "class id 3 is above --num-classes 2"),
        ((*seg, "--data", str(tmp_path / "nowhere")), "images/training: missing; the ADE20K layout holds"),
        (("depth", "--checkpoint", str(student_run), "--data", str(ade20k)), "ade_tiny/train: missing; the NYU layout holds"),
        ((*seg, "--data", str(ade20k), "--num-classes", "0"), "--num-classes: 0 is not allowed; it must be at least 1"),
        ((*seg, "--data", str(ade20k), "--features", "decoder"), "--features: features 'decoder' is unknown"),
        ((*seg, "--data", str(ade20k), "--features", "projector:nobody"), "this student has no projector for 'nobody'"),
        (("depth", "--data", str(nyu), "--teacher", "dino2reg_vitlarge_14"), "--teacher needs --config"),
        (("depth", "--data", str(nyu), "--teacher", "nobody", "--config", str(student_run)), "--teacher nobody: not a teacher"),
        (("depth", "--data", str(nyu), "--teacher", "mast3r_vitlarge_16", "--config", str(student_run), "--features",
          "projector:mast3r_vitlarge_16"), "a teacher has no projectors"),
        (("depth", "--data", str(nyu), "--checkpoint", str(student_run), "--teacher", "x"), "give either --checkpoint"),
        (("depth", "--data", str(nyu), "--max-depth", "-1", "--checkpoint", str(student_run)), "--max-depth: -1.0 is not allowed"),
        (("depth", "--data", str(nyu), "--image-size", "50", "--checkpoint", str(student_run)), "a multiple of the patch size 14"),
    ]
    for argv, message in cases:
        assert _eval(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out").exists()
    assert _eval_report(tmp_path) == 2 and "no probe results" in capsys.readouterr().err


def test_probe_specs_of_a_run_are_checked_before_training(tmp_path: Path, demo_shards: Path, ade20k: Path) -> None:
    from conftest import tiny_overrides
    from dune_scale.config import ConfigError
    from dune_scale.distributed import DistInfo
    from dune_scale.engine.compose import check_run

    def check(*probes: str) -> None:
        check_run(load_config(TINY_CPU, tiny_overrides(tmp_path, demo_shards, "eval.probe_every_steps=2", *probes)), DistInfo())

    check(f"eval.probes=[{{kind: linear-seg, data: {ade20k}, num_classes: 3}}]")
    for probes, message in (
        ("eval.probes=[{kind: segmentation, data: x}]", "eval.probes.0.kind: 'segmentation' is not a probe; choose one of knn"),
        (f"eval.probes=[{{kind: linear-seg, data: {ade20k}, classes: 3}}]", "eval.probes.0.classes: unknown for linear-seg"),
        ("eval.probes=[{kind: depth}]", "eval.probes.0.data: missing"),
        (f"eval.probes=[{{kind: depth, data: {ade20k}, epochs: two}}]", "eval.probes.0.epochs: 'two' is not a valid int"),
        (f"eval.probes=[{{kind: depth, data: {ade20k}}}]", f"eval.probes (depth): {ade20k}/train: missing; the NYU layout"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check(probes)
    with pytest.raises(ConfigError, match="eval.probe_every_steps: 2 is not allowed; it needs eval.probes"):
        check()


def test_a_rank_without_images_still_runs_its_forwards_and_learns_the_feature_shape(student_run: Path, ade20k: Path) -> None:
    """Spread over more ranks than images, a rank holds nothing but runs the same (blank) forwards
    and knows the token shape, so the head it builds matches the others'."""
    from dune_scale.engine.export import build_student_from, read_student
    from dune_scale.eval.dense import feature_statistics
    from dune_scale.eval.features import extract, feature_cache, student_source
    from dune_scale.eval.probe_data import SegmentationSet, ade20k_pairs

    calls = []
    source = student_source(build_student_from(read_student(student_run)), "encoder")
    counted = dataclasses.replace(source, tokens=lambda images: calls.append(len(images)) or source.tokens(images))
    data = SegmentationSet(ade20k_pairs(ade20k, "val")[:1], 56, 3)
    with feature_cache() as cache:
        found = extract(counted, data, "patch", cache, "val", torch.device("cpu"), batch_size=4, rank=1, world=2)
        mean, var = feature_statistics(found, torch.device("cpu"))
    assert calls == [1] and found.features.shape == (0, 16, 48) and found.grid == (4, 4)
    assert mean.shape == var.shape == (48,)
