"""The three DUNE teachers against the golden files made with the official code (≤ 1e-4)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dune_scale.teachers import (
    TeacherCheckpointError,
    TeacherEnsemble,
    build_teacher,
    convert_teacher,
    get_teacher_spec,
)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
TEACHERS = ["dino2reg_vitlarge_14", "mast3r_vitlarge_16", "multihmr_vitlarge_14_672"]
pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden files not found at {GOLDEN}")


def _golden(name: str) -> tuple[Path, dict]:
    return GOLDEN / f"{name}_checkpoint.pt", torch.load(GOLDEN / f"{name}_io.pt", weights_only=True)


def _arch(io: dict) -> dict:
    """The constructor settings the golden file records, in our names."""
    c = io["config"]
    if "enc_embed_dim" in c:
        return {"embed_dim": c["enc_embed_dim"], "depth": c["enc_depth"], "num_heads": c["enc_num_heads"],
                "patch_size": c["patch_size"], "rope_base": c["rope_freq"]}
    return {"embed_dim": c["embed_dim"], "depth": c["depth"], "num_heads": c["num_heads"], "patch_size": c["patch_size"],
            "img_size": c["img_size"], "num_register_tokens": c["num_register_tokens"],
            "interpolate_offset": c["interpolate_offset"], "interpolate_antialias": c["interpolate_antialias"]}


def _assert_matches(teacher: torch.nn.Module, inputs: torch.Tensor, expected: dict) -> None:
    """Every key of ``expected`` (cls / patch / reg) within 1e-4; a None expects None."""
    with torch.no_grad():
        out = teacher.forward_features(inputs)
    for key, value in expected.items():
        if value is None:
            assert out[key] is None, key
        else:
            assert (out[key] - value).abs().max().item() <= 1e-4, key


def _expected(io: dict) -> dict:
    return {key: io[key] for key in ("cls", "patch", "reg")}


@pytest.mark.parametrize("name", TEACHERS)
def test_golden_features_from_official_checkpoint_and_safetensors(name: str, tmp_path: Path) -> None:
    checkpoint, io = _golden(name)
    teacher = build_teacher(name, checkpoint, **_arch(io)).eval()
    _assert_matches(teacher, io["input"], _expected(io))
    if "native_input" in io["extra"]:  # the no-resampling branch of the positional embedding
        native = {"cls": io["extra"]["native_cls"], "patch": io["extra"]["native_patch"]}
        _assert_matches(teacher, io["extra"]["native_input"], native)
    weights, meta = convert_teacher(name, checkpoint, tmp_path / name, **_arch(io))
    assert weights.suffix == ".safetensors" and meta.is_file()
    _assert_matches(build_teacher(name, weights).eval(), io["input"], _expected(io))


def test_mast3r_architecture_is_read_from_the_checkpoint_args() -> None:
    checkpoint, io = _golden("mast3r_vitlarge_16")
    teacher = build_teacher("mast3r_vitlarge_16", checkpoint).eval()  # enc dims from the args string
    assert teacher.embed_dim == io["config"]["enc_embed_dim"]
    _assert_matches(teacher, io["input"], _expected(io))


@pytest.mark.parametrize("name", TEACHERS)
def test_bf16_features_agree_with_fp32(name: str) -> None:
    checkpoint, io = _golden(name)
    teacher = build_teacher(name, checkpoint, **_arch(io))
    reference = TeacherEnsemble({name: teacher}, {name: ("patch",)}, teacher.patch_size, torch.float32)(io["input"])
    teacher_bf16 = build_teacher(name, checkpoint, **_arch(io))
    low = TeacherEnsemble({name: teacher_bf16}, {name: ("patch",)}, teacher.patch_size, torch.bfloat16)(io["input"])
    cos = F.cosine_similarity(low[name]["patch"].float(), reference[name]["patch"], dim=-1)
    assert cos.min().item() >= 0.99


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TeacherCheckpointError, match=rf"teacher dino2reg_vitlarge_14: checkpoint {tmp_path}/none.pth: file not found"):
        build_teacher("dino2reg_vitlarge_14", tmp_path / "none.pth")


def test_file_of_another_teacher() -> None:
    mast3r, _ = _golden("mast3r_vitlarge_16")
    with pytest.raises(TeacherCheckpointError, match=r"teacher dino2reg_vitlarge_14: checkpoint .*mast3r.*expected a DINOv2 release state dict.*another teacher"):
        build_teacher("dino2reg_vitlarge_14", mast3r, embed_dim=64, depth=3, num_heads=4)
    dino, _ = _golden("dino2reg_vitlarge_14")
    with pytest.raises(TeacherCheckpointError, match=r"teacher multihmr_vitlarge_14_672: .*expected a Multi-HMR training checkpoint"):
        build_teacher("multihmr_vitlarge_14_672", dino)
    multihmr, _ = _golden("multihmr_vitlarge_14_672")
    with pytest.raises(TeacherCheckpointError, match=r"teacher mast3r_vitlarge_16: .*expected a MASt3R checkpoint"):
        build_teacher("mast3r_vitlarge_16", multihmr)


def test_truncated_file(tmp_path: Path) -> None:
    source, _ = _golden("dino2reg_vitlarge_14")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(TeacherCheckpointError, match=rf"checkpoint {cut}: cannot be read \(truncated, corrupt"):
        build_teacher("dino2reg_vitlarge_14", cut)


def test_shape_mismatch_names_the_key() -> None:
    checkpoint, io = _golden("dino2reg_vitlarge_14")
    arch = {**_arch(io), "embed_dim": 128, "num_heads": 4}
    with pytest.raises(TeacherCheckpointError, match=r"key 'cls_token' has shape \(1, 1, 64\) but the model expects \(1, 1, 128\)"):
        build_teacher("dino2reg_vitlarge_14", checkpoint, **arch)
    with pytest.raises(TeacherCheckpointError, match=r"missing key 'blocks.3.norm1.weight'"):
        build_teacher("dino2reg_vitlarge_14", checkpoint, **{**_arch(io), "depth": 4})


def test_safetensors_of_another_teacher_is_refused(tmp_path: Path) -> None:
    checkpoint, io = _golden("multihmr_vitlarge_14_672")
    weights, _ = convert_teacher("multihmr_vitlarge_14_672", checkpoint, tmp_path / "m", **_arch(io))
    with pytest.raises(TeacherCheckpointError, match="converted from teacher 'multihmr_vitlarge_14_672', not 'dino2reg_vitlarge_14'"):
        build_teacher("dino2reg_vitlarge_14", weights)
    shutil.copy(weights, tmp_path / "n.safetensors")  # no JSON beside it
    with pytest.raises(TeacherCheckpointError, match="architecture file .*n.json is missing"):
        build_teacher("multihmr_vitlarge_14_672", tmp_path / "n.safetensors")


def _vit_params(dim: int, depth: int, patch: int, grid: int, registers: int, mask_token: bool) -> int:
    """Per block: LN 2D, qkv 3D²+3D, proj D²+D, ls D, LN 2D, fc1 4D²+4D, fc2 4D²+D, ls D = 12D² + 15D."""
    blocks = depth * (12 * dim * dim + 15 * dim)
    embed = 3 * patch * patch * dim + dim
    tokens = dim * (1 + grid * grid) + dim + registers * dim + (dim if mask_token else 0)
    return blocks + embed + tokens + 2 * dim


def test_full_size_parameter_counts_on_meta() -> None:
    counts = {}
    for name in TEACHERS:
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build_teacher(name).parameters())
    assert counts["dino2reg_vitlarge_14"] == _vit_params(1024, 24, 14, 37, 4, True) == 304_372_736
    assert counts["multihmr_vitlarge_14_672"] == _vit_params(1024, 24, 14, 37, 0, True)
    # MASt3R: no cls/pos/registers/layer scale: 24·(12D² + 13D) + patch 16 + enc_norm.
    assert counts["mast3r_vitlarge_16"] == 24 * (12 * 1024**2 + 13 * 1024) + 3 * 256 * 1024 + 1024 + 2 * 1024
    assert all(3.0e8 < c < 3.1e8 for c in counts.values())


def test_448_px_gives_a_32x32_grid_for_every_teacher_after_alignment() -> None:
    torch.manual_seed(0)
    teachers = {name: build_teacher(name, embed_dim=16, depth=1, num_heads=2) for name in TEACHERS}
    ensemble = TeacherEnsemble(teachers, {n: get_teacher_spec(n).tokens for n in TEACHERS}, 14, torch.float32)
    out = ensemble(torch.randn(1, 3, 448, 448))
    for name in TEACHERS:
        assert out[name]["patch"].shape == (1, 32 * 32, 16), name
    assert out["dino2reg_vitlarge_14"]["cls"].shape == (1, 16)
    ensemble.train()
    assert not any(m.training for m in ensemble.modules())
    assert not any(p.requires_grad for p in ensemble.parameters())
