"""PCA feature maps: the reusable function and ``launch/pca.py`` on a student with its teachers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import TINY_CPU
from dune_scale.cli.pca import main as pca_main
from dune_scale.eval.pca import LABEL_HEIGHT, pca_grid, pca_maps


def test_maps_are_rgb_in_unit_range_and_follow_the_features() -> None:
    g = torch.Generator().manual_seed(0)
    patch = torch.randn(3, 12, 16, generator=g)
    maps = pca_maps(patch, (3, 4))
    assert maps.shape == (3, 3, 3, 4)
    assert maps.min() == 0.0 and maps.max() == 1.0  # each component spans [0, 1] over all images jointly
    assert not torch.equal(maps[0], maps[1])
    assert torch.equal(pca_maps(patch, (3, 4)), maps)  # signs fixed: same features, same colours
    # Fitted jointly: an image's colours depend on the others in the set.
    assert not torch.allclose(pca_maps(patch[:1], (3, 4))[0], maps[0])
    with pytest.raises(ValueError, match="do not fill a 5x5 grid"):
        pca_maps(patch, (5, 5))


def test_grid_places_image_then_maps_per_row() -> None:
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    maps = {"student": torch.rand(2, 3, 2, 2), "teacher": torch.rand(2, 3, 2, 2)}
    grid = pca_grid(images, maps)
    assert grid.shape == (LABEL_HEIGHT + 2 * 28, 3 * 28, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid[LABEL_HEIGHT + 28 :, :28], images[1].permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def tiny_student_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as training leaves it (config.yaml + student.safetensors), without training."""
    from dune_scale.config import load_config, save_config
    from dune_scale.engine.compose import build_student
    from dune_scale.teachers import build_teacher_ensemble

    run = tmp_path_factory.mktemp("pca") / "run"
    run.mkdir()
    cfg = load_config(TINY_CPU, [f"run.output_dir={run}"])
    torch.manual_seed(0)
    teachers = build_teacher_ensemble(cfg.teachers.models, 14, "cpu", torch.float32)
    student = build_student(cfg, teachers.embed_dims, teachers.tokens)
    save_config(cfg, run / "config.yaml")
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(run / "student.safetensors"))
    return run


def _photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # 60×80 blocks
    Image.fromarray(pixels).save(path)
    return path


def test_launch_pca_writes_student_and_teacher_maps(tiny_student_run: Path, tmp_path: Path, capsys) -> None:
    pictures = [str(_photo(tmp_path / f"img{i}.jpg", i)) for i in range(2)]
    out = tmp_path / "grid.png"
    assert pca_main(["--student", str(tiny_student_run), "--images", *pictures, "--teachers", "--out", str(out)]) == 0
    assert "columns: image, student, dino2reg_vitlarge_14, mast3r_vitlarge_16, multihmr_vitlarge_14_672" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    assert grid.shape == (LABEL_HEIGHT + 2 * 56, 5 * 56, 3)
    student_maps = [grid[LABEL_HEIGHT + r * 56 : LABEL_HEIGHT + (r + 1) * 56, 56:112] for r in range(2)]
    assert not np.array_equal(student_maps[0], student_maps[1])
    assert student_maps[0].min() == 0 or student_maps[1].min() == 0  # components span the full range jointly


def test_a_picture_whose_halves_differ_gets_two_separated_colours(tiny_student_run: Path, tmp_path: Path) -> None:
    """The map's content: a red left half and a blue right half (two patch columns each at 56 px)
    give two colours split exactly along the halves by the first component (the map's red channel);
    the other two components only show the positional embeddings of this untrained student."""
    halves = np.zeros((56, 56, 3), np.uint8)
    halves[:, :28], halves[:, 28:] = (200, 30, 30), (30, 30, 200)
    Image.fromarray(halves).save(tmp_path / "halves.png")
    out = tmp_path / "grid.png"
    assert pca_main(["--student", str(tiny_student_run), "--images", str(tmp_path / "halves.png"), "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out)).astype(int)
    assert abs(grid[LABEL_HEIGHT + 7, 7] - (200, 30, 30)).max() <= 2  # the image column shows the picture
    first = grid[LABEL_HEIGHT : LABEL_HEIGHT + 56, 56:112, 0][7::14, 7::14]  # the centre of each of the 4×4 patches
    left, right = first[:, :2], first[:, 2:]
    if left.mean() > right.mean():
        left, right = right, left  # a component's sign is a convention
    assert left.max() < 30 and right.min() > 225, first


def test_bad_pca_inputs_are_named(tiny_student_run: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert pca_main(["--student", str(tiny_student_run), "--images", str(broken), "--out", str(tmp_path / "g.png")]) == 2
    assert str(broken) in capsys.readouterr().err
    photo = str(_photo(tmp_path / "p.jpg", 0))
    assert pca_main(["--student", str(tiny_student_run / "student.safetensors"), "--images", photo, "--size", "50",
                     "--out", str(tmp_path / "g.png")]) == 2
    assert "not a multiple of the student's patch size 14" in capsys.readouterr().err
    from dune_scale.engine.export import export

    exported = export(tiny_student_run, "hf", tmp_path / "hf")  # weights and spec, no run config
    assert pca_main(["--student", str(exported), "--images", photo, "--teachers", "--out", str(tmp_path / "g.png")]) == 2
    assert "no run config (config.yaml) naming the teachers" in capsys.readouterr().err
