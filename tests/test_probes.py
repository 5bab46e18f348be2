"""The probes on frozen features (linear segmentation, depth; issue 26): tiny ADE20K- and NYU-layout
sets whose answer the features hold (colour-coded classes, brightness-coded depth, in blocks of one
patch), a student and a teacher each probed with one command, the results table and model card, the
bad-input rules, and the probes during training leaving the training bitwise unchanged."""

from __future__ import annotations

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
    print(student_seg, teacher_seg, student_depth)
