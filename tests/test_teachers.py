"""The three DUNE teachers against the golden files made with the official code (≤ 1e-4), their
checkpoint loaders and errors, and the ensemble (alignment, bf16, frozen)."""

from __future__ import annotations

import argparse
import pathlib
import runpy
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dune_scale.teachers import (
    TEACHER_SPECS,
    TeacherCheckpointError,
    TeacherEnsemble,
    align_images,
    build_teacher,
    build_teacher_ensemble,
    convert_teacher,
    get_teacher_spec,
)

# CI clones the repository beside a copy of shared/.
GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
TEACHERS = ["dino2reg_vitlarge_14", "mast3r_vitlarge_16", "multihmr_vitlarge_14_672"]
TOL = 1e-4


@pytest.fixture(scope="module")
def golden() -> Path:
    # A missing golden set is a broken checkout, not a reason to skip the exactness tests.
    assert (GOLDEN / "README.md").is_file(), f"golden teacher files not found at {GOLDEN} (expected shared/ beside the repository)"
    return GOLDEN


def _load(golden: Path, name: str) -> tuple[Path, dict]:
    return golden / f"{name}_checkpoint.pt", torch.load(golden / f"{name}_io.pt", weights_only=True)


def _arch(io: dict) -> dict:
    """The constructor settings the golden file's ``config`` records, in our names."""
    c = io["config"]
    common = {"mlp_ratio": c["mlp_ratio"], "norm_eps": c["layer_norm_eps"], "patch_size": c["patch_size"]}
    if "enc_embed_dim" in c:
        return {**common, "embed_dim": c["enc_embed_dim"], "depth": c["enc_depth"], "num_heads": c["enc_num_heads"],
                "rope_base": c["rope_freq"]}
    return {**common, "embed_dim": c["embed_dim"], "depth": c["depth"], "num_heads": c["num_heads"],
            "img_size": c["img_size"], "num_register_tokens": c["num_register_tokens"],
            "layerscale_init": c["init_values"], "interpolate_offset": c["interpolate_offset"],
            "interpolate_antialias": c["interpolate_antialias"]}


def _expected(io: dict) -> dict:
    return {key: io[key] for key in ("cls", "patch", "reg")}


def _assert_matches(teacher: torch.nn.Module, inputs: torch.Tensor, expected: dict) -> None:
    """Every key of ``expected`` (cls / patch / reg) within 1e-4; a None expects None."""
    with torch.no_grad():
        out = teacher.forward_features(inputs)
    for key, value in expected.items():
        if value is None:
            assert out[key] is None, key
        else:
            assert out[key].shape == value.shape, key
            error = (out[key] - value).abs().max().item()
            assert error <= TOL, f"{key}: max |diff| {error:.2e}"


@pytest.mark.parametrize("name", TEACHERS)
def test_golden_features_from_official_checkpoint_and_safetensors(golden: Path, name: str, tmp_path: Path) -> None:
    checkpoint, io = _load(golden, name)
    teacher = build_teacher(name, checkpoint, **_arch(io)).eval()
    _assert_matches(teacher, io["input"], _expected(io))

    weights, meta = convert_teacher(name, checkpoint, tmp_path / name, **_arch(io))
    assert (weights.name, meta.name) == (f"{name}.safetensors", f"{name}.json")
    converted = build_teacher(name, weights).eval()  # architecture from the JSON
    assert converted.teacher_arch == teacher.teacher_arch
    _assert_matches(converted, io["input"], _expected(io))


@pytest.mark.parametrize("name", ["dino2reg_vitlarge_14", "multihmr_vitlarge_14_672"])
def test_dinov2_intermediates_and_native_resolution(golden: Path, name: str) -> None:
    """Resampled positional table, pre-norm tokens, and the no-resampling branch at img_size."""
    checkpoint, io = _load(golden, name)
    extra = io["extra"]
    teacher = build_teacher(name, checkpoint, **_arch(io)).eval()
    height, width = io["input"].shape[-2:]
    with torch.no_grad():
        pos = teacher.interpolate_pos_encoding(height * width // 14**2, height, width)
        torch.testing.assert_close(pos, extra["pos_embed_interpolated"], atol=TOL, rtol=0)
        torch.testing.assert_close(teacher.forward_tokens(io["input"]), extra["prenorm"], atol=TOL, rtol=0)
    assert extra["native_input"].shape[-1] == io["config"]["img_size"]
    _assert_matches(teacher, extra["native_input"], {"cls": extra["native_cls"], "patch": extra["native_patch"]})


def test_mast3r_architecture_is_read_from_the_checkpoint_args(golden: Path) -> None:
    checkpoint, io = _load(golden, "mast3r_vitlarge_16")
    teacher = build_teacher("mast3r_vitlarge_16", checkpoint).eval()  # no arch: all from the args string
    c = io["config"]
    assert (teacher.embed_dim, len(teacher.blocks), teacher.num_heads) == (c["enc_embed_dim"], c["enc_depth"], c["enc_num_heads"])
    assert teacher.teacher_arch["img_size"] == 512 and teacher.teacher_arch["rope_base"] == 100.0
    _assert_matches(teacher, io["input"], _expected(io))


@pytest.mark.parametrize("name", ["mast3r_vitlarge_16", "multihmr_vitlarge_14_672"])
def test_release_files_with_argparse_namespace_args(golden: Path, name: str, tmp_path: Path) -> None:
    """The real files hold ``args`` as an argparse.Namespace: allow-listed, still weights_only."""
    checkpoint, io = _load(golden, name)
    raw = torch.load(checkpoint, weights_only=True)
    raw["args"] = argparse.Namespace(**raw["args"])
    torch.save(raw, tmp_path / "release.pth")
    _assert_matches(build_teacher(name, tmp_path / "release.pth", **_arch(io)).eval(), io["input"], _expected(io))


@pytest.mark.parametrize("name", TEACHERS)
def test_bf16_features_agree_with_fp32(golden: Path, name: str) -> None:
    checkpoint, io = _load(golden, name)
    tokens = {name: ("cls", "patch")}
    patch = get_teacher_spec(name).patch_size
    reference = TeacherEnsemble({name: build_teacher(name, checkpoint, **_arch(io))}, tokens, patch, torch.float32)
    low = TeacherEnsemble({name: build_teacher(name, checkpoint, **_arch(io))}, tokens, patch, torch.bfloat16)
    assert next(low.parameters()).dtype == torch.bfloat16
    expected, got = reference(io["input"])[name], low(io["input"])[name]
    for token in ("cls", "patch"):
        cos = F.cosine_similarity(got[token].float(), expected[token], dim=-1)  # one value per token
        assert cos.min().item() >= 0.99, token


# --- checkpoint errors: one TeacherCheckpointError naming teacher, file and key -------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.pth"
    with pytest.raises(TeacherCheckpointError, match=rf"^teacher dino2reg_vitlarge_14: checkpoint {missing}: file not found$"):
        build_teacher("dino2reg_vitlarge_14", missing)


def test_file_of_another_teacher(golden: Path) -> None:
    mast3r, _ = _load(golden, "mast3r_vitlarge_16")
    with pytest.raises(
        TeacherCheckpointError,
        match=rf"^teacher dino2reg_vitlarge_14: checkpoint {mast3r}: expected a DINOv2 release state dict .* "
        r"but key 'cls_token' is not there; this is a MASt3R checkpoint \('model' \+ 'args'\), another teacher's file\?$",
    ):
        build_teacher("dino2reg_vitlarge_14", mast3r)
    dino, _ = _load(golden, "dino2reg_vitlarge_14")
    with pytest.raises(
        TeacherCheckpointError,
        match=r"^teacher multihmr_vitlarge_14_672: .* key 'model_state_dict' is not there; this is a DINOv2 release state dict",
    ):
        build_teacher("multihmr_vitlarge_14_672", dino)
    multihmr, _ = _load(golden, "multihmr_vitlarge_14_672")
    with pytest.raises(
        TeacherCheckpointError,
        match=r"^teacher mast3r_vitlarge_16: .* key 'model' is not there; this is a Multi-HMR training checkpoint",
    ):
        build_teacher("mast3r_vitlarge_16", multihmr)


def test_truncated_file(golden: Path, tmp_path: Path) -> None:
    source, _ = _load(golden, "dino2reg_vitlarge_14")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(TeacherCheckpointError, match=rf"^teacher dino2reg_vitlarge_14: checkpoint {cut}: cannot be read \(truncated or corrupt file\?\)"):
        build_teacher("dino2reg_vitlarge_14", cut)


def test_not_allow_listed_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"cls_token": torch.zeros(1), "note": pathlib.PurePosixPath("x")}, path)
    with pytest.raises(TeacherCheckpointError, match=r"class pathlib\..*PurePosixPath, which is not allow-listed \(only argparse.Namespace\); refusing to unpickle it"):
        build_teacher("dino2reg_vitlarge_14", path)


def test_shape_mismatch_and_missing_or_extra_keys_name_the_key(golden: Path) -> None:
    checkpoint, io = _load(golden, "dino2reg_vitlarge_14")
    arch = _arch(io)
    with pytest.raises(TeacherCheckpointError, match=rf"checkpoint {checkpoint}: key 'cls_token' has shape \(1, 1, 64\) but the model expects \(1, 1, 128\)"):
        build_teacher("dino2reg_vitlarge_14", checkpoint, **{**arch, "embed_dim": 128})
    with pytest.raises(TeacherCheckpointError, match=r"key 'pos_embed' has shape \(1, 50, 64\) but the model expects \(1, 1370, 64\)"):
        build_teacher("dino2reg_vitlarge_14", checkpoint, **{**arch, "img_size": 518})
    with pytest.raises(TeacherCheckpointError, match=r"missing key 'blocks.3.norm1.weight' \(14 missing\)"):
        build_teacher("dino2reg_vitlarge_14", checkpoint, **{**arch, "depth": 4})
    with pytest.raises(TeacherCheckpointError, match=r"unexpected key 'blocks.2.norm1.weight' \(14 unexpected\)"):
        build_teacher("dino2reg_vitlarge_14", checkpoint, **{**arch, "depth": 2})


def test_safetensors_errors(golden: Path, tmp_path: Path) -> None:
    checkpoint, io = _load(golden, "multihmr_vitlarge_14_672")
    weights, _ = convert_teacher("multihmr_vitlarge_14_672", checkpoint, tmp_path / "m", **_arch(io))
    with pytest.raises(
        TeacherCheckpointError,
        match=r"^teacher dino2reg_vitlarge_14: .*key 'teacher' of m.json: "
        r"converted from teacher 'multihmr_vitlarge_14_672', not 'dino2reg_vitlarge_14'",
    ):
        build_teacher("dino2reg_vitlarge_14", weights)
    shutil.copy(weights, tmp_path / "n.safetensors")  # no JSON beside it
    with pytest.raises(TeacherCheckpointError, match=r"architecture file .*n.json is missing or unreadable"):
        build_teacher("multihmr_vitlarge_14_672", tmp_path / "n.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copy(weights.with_suffix(".json"), cut.with_suffix(".json"))
    with pytest.raises(TeacherCheckpointError, match=rf"checkpoint {cut}: cannot be read \(truncated or corrupt safetensors\?\)"):
        build_teacher("multihmr_vitlarge_14_672", cut)


def test_convert_teacher_command_line(golden: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "launch" / "convert_teacher.py"))["main"]
    checkpoint, io = _load(golden, "mast3r_vitlarge_16")  # architecture from the args string
    assert main(["mast3r_vitlarge_16", str(checkpoint), str(tmp_path / "mast3r")]) == 0
    _assert_matches(build_teacher("mast3r_vitlarge_16", tmp_path / "mast3r.safetensors").eval(), io["input"], _expected(io))
    assert main(["dino2reg_vitlarge_14", str(checkpoint), str(tmp_path / "wrong")]) == 2
    assert "another teacher's file" in capsys.readouterr().err


def test_unknown_teacher_and_arch_setting() -> None:
    with pytest.raises(ValueError, match="unknown teacher 'dino3'; known teachers: dino2reg_vitlarge_14, mast3r_vitlarge_16, multihmr_vitlarge_14_672"):
        build_teacher("dino3")
    with pytest.raises(ValueError, match=r"teacher mast3r_vitlarge_16: unknown arch setting\(s\) num_register_tokens; known: embed_dim"):
        build_teacher("mast3r_vitlarge_16", embed_dim=16, depth=1, num_heads=2, num_register_tokens=4)


# --- full size, alignment, ensemble ---------------------------------------------------------------


def _vit_params(dim: int, depth: int, patch: int, grid: int, registers: int) -> int:
    """Per block: norm1 2D, qkv 3D²+3D, proj D²+D, ls1 D, norm2 2D, fc1 4D²+4D, fc2 4D²+D, ls2 D
    = 12D² + 15D; patch embed 3p²D + D; pos (1+grid²)D; cls D; registers RD; mask_token D; norm 2D."""
    return depth * (12 * dim * dim + 15 * dim) + 3 * patch * patch * dim + dim + (1 + grid * grid) * dim + dim + registers * dim + dim + 2 * dim


def test_full_size_parameter_counts_on_meta() -> None:
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build_teacher(name).parameters()) for name in TEACHERS}
    # ViT-L/14 reg4 at 518 px (37×37 table): 24·12,598,272 + 603,136 + 1,402,880 + 1024 + 4096 + 1024 + 2048.
    assert counts["dino2reg_vitlarge_14"] == _vit_params(1024, 24, 14, 37, 4) == 304_372_736
    assert counts["multihmr_vitlarge_14_672"] == _vit_params(1024, 24, 14, 37, 0) == 304_368_640
    # MASt3R encoder: no cls/pos/registers/layer scale: 24·(12D² + 13D) + patch 16 (3·256·D + D) + enc_norm 2D.
    assert counts["mast3r_vitlarge_16"] == 24 * (12 * 1024**2 + 13 * 1024) + 3 * 256 * 1024 + 1024 + 2 * 1024 == 303_098_880


def test_448_px_gives_a_32x32_grid_for_every_full_size_teacher() -> None:
    seen: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        teachers = {name: build_teacher(name) for name in TEACHERS}
        for name, teacher in teachers.items():
            teacher.register_forward_pre_hook(lambda module, args, name=name: seen.update({name: tuple(args[0].shape)}))
        ensemble = TeacherEnsemble(teachers, {n: get_teacher_spec(n).tokens for n in TEACHERS}, 14, torch.float32)
        out = ensemble(torch.empty(2, 3, 448, 448))
    assert seen == {"dino2reg_vitlarge_14": (2, 3, 448, 448), "multihmr_vitlarge_14_672": (2, 3, 448, 448), "mast3r_vitlarge_16": (2, 3, 512, 512)}
    assert {name: {k: tuple(v.shape) for k, v in o.items()} for name, o in out.items()} == {
        "dino2reg_vitlarge_14": {"cls": (2, 1024), "patch": (2, 32 * 32, 1024)},
        "mast3r_vitlarge_16": {"patch": (2, 32 * 32, 1024)},
        "multihmr_vitlarge_14_672": {"patch": (2, 32 * 32, 1024)},
    }


@pytest.mark.parametrize("size", [336, 448])
def test_alignment_equals_dunes_scale_factor_resize(size: int) -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, size, size + 56)
    dune = F.interpolate(images, scale_factor=16 / 14, mode="bicubic", align_corners=True)
    torch.testing.assert_close(align_images(images, 16, 14), dune, rtol=0, atol=0)
    assert align_images(images, 14, 14) is images


def test_ensemble_is_frozen_and_built_from_config_entries() -> None:
    torch.manual_seed(0)
    tiny = {"embed_dim": 16, "depth": 1, "num_heads": 2}
    entry = lambda name, **kw: SimpleNamespace(**{"name": name, "checkpoint": None, "random_init": True, "arch": tiny, "tokens": [], **kw})  # noqa: E731
    ensemble = build_teacher_ensemble(
        [entry("dino2reg_vitlarge_14"), entry("mast3r_vitlarge_16", tokens=["cls", "patch"])], 14, "cpu", torch.float32
    )
    assert ensemble.tokens == {"dino2reg_vitlarge_14": ("cls", "patch"), "mast3r_vitlarge_16": ("cls", "patch")}
    assert ensemble.embed_dims == {"dino2reg_vitlarge_14": 16, "mast3r_vitlarge_16": 16}
    ensemble.train()
    assert not any(m.training for m in ensemble.modules())
    assert not any(p.requires_grad for p in ensemble.parameters())
    out = ensemble(torch.randn(1, 3, 56, 84))
    assert out["mast3r_vitlarge_16"]["patch"].shape == (1, 4 * 6, 16) and not out["mast3r_vitlarge_16"]["patch"].requires_grad
    with pytest.raises(ValueError, match="teacher multihmr_vitlarge_14_672: no checkpoint given; set its checkpoint path .*random_init: true"):
        build_teacher_ensemble([entry("multihmr_vitlarge_14_672", random_init=False)], 14, "cpu", torch.float32)
    with pytest.raises(ValueError, match="teacher dino2reg_vitlarge_14: token types must be a non-empty subset"):
        TeacherEnsemble({"dino2reg_vitlarge_14": build_teacher("dino2reg_vitlarge_14", **tiny)}, {"dino2reg_vitlarge_14": ("reg",)}, 14)


def test_registry_describes_every_teacher() -> None:
    assert {n: (s.family, s.patch_size, s.tokens, s.domain) for n, s in TEACHER_SPECS.items()} == {
        "dino2reg_vitlarge_14": ("dinov2", 14, ("cls", "patch"), "dino2"),
        "mast3r_vitlarge_16": ("croco", 16, ("patch",), "mast3r"),
        "multihmr_vitlarge_14_672": ("dinov2", 14, ("patch",), "multihmr"),
    }


def test_mast3r_folded_renormalisation_and_cached_rope_tables() -> None:
    """The ImageNet → 0.5/0.5 renormalisation folded into the patch embedding equals renormalising
    the images first (float tolerance); RoPE tables are built once per grid and reused by every
    block and forward; new weights refresh the folded embedding."""
    from dune_scale.models.croco import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    teacher = build_teacher("mast3r_vitlarge_16", embed_dim=32, depth=2, num_heads=2).requires_grad_(False)
    images = torch.randn(2, 3, 48, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    renormalised = (images * std + mean - 0.5) / 0.5
    with torch.no_grad():
        expected = teacher.patch_embed(renormalised)
        torch.testing.assert_close(teacher.patch_embed(images, *teacher.renormalising_patch_embedding()), expected,
                                   rtol=0, atol=2e-6)
        first = teacher.forward_features(images)["patch"]
        tables = teacher.rope_tables(3, 4, images.device)
        assert teacher.rope_tables(3, 4, images.device) is tables and len(teacher._derived) == 2
        torch.testing.assert_close(teacher.forward_features(images)["patch"], first, rtol=0, atol=0)
        teacher.patch_embed.proj.weight.mul_(2)
        torch.testing.assert_close(
            teacher.patch_embed(images, *teacher.renormalising_patch_embedding()), teacher.patch_embed(renormalised),
            rtol=0, atol=4e-6,
        )


def test_fp8_teachers_are_refused_on_cpu_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import TINY_CPU
    from dune_scale.cli.bench import main as bench_main
    from dune_scale.cli.train import main as train_main

    for main in (train_main, bench_main):
        assert main(["--config", str(TINY_CPU), "teachers.dtype=fp8", f"run.output_dir={tmp_path}", "run.console=none"]) == 2
        err = capsys.readouterr().err
        assert "teachers.dtype: 'fp8'" in err and "CUDA GPU" in err and "Traceback" not in err


def test_default_teacher_precision_is_closer_to_fp32_than_all_bf16() -> None:
    """Issue 15: fp32 weights under bf16 autocast (the official code, our default) keep the residual
    stream, norms and layer scales in fp32; with trained-size gammas that is measurably closer to
    fp32 than casting the whole teacher to bf16 (launch/teacher_precision.py measures full size)."""
    from dune_scale.teachers.fidelity import PRECISION_MODES, make_trained_like, precision_errors

    generator = torch.Generator().manual_seed(0)
    teacher = build_teacher("dino2reg_vitlarge_14", embed_dim=64, depth=6, num_heads=4, img_size=98).requires_grad_(False)
    make_trained_like(teacher, generator, gamma_range=(0.5, 1.0))
    errors = precision_errors(teacher, torch.randn(2, 3, 84, 112, generator=generator), PRECISION_MODES)
    default, bf16 = errors["fp32_residual"]["patch"], errors["bf16"]["patch"]
    # Mean over 96 tokens (one cls token per image is too few to rank the modes): measured 0.61×.
    assert 1 - default["cos_mean"] < 0.8 * (1 - bf16["cos_mean"])
    assert errors["fp32_residual"]["cls"]["cos_min"] > 0.999 and default["cos_min"] > 0.99  # bf16 GEMMs still agree


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["teachers.dtype=fp32", "teachers.residual=bf16"], "teachers.residual: 'bf16' is not allowed; with teachers.dtype=fp32"),
        (["teachers.cuda_graphs=true"], "teachers.cuda_graphs: True is not allowed; CUDA-graph teachers failed"),
        (["teachers.dtype=fp16"], "teachers.dtype: 'fp16' is not allowed; choose one of auto | bf16 | fp32 | fp8"),
    ],
)
def test_speed_switches_are_validated(overrides: list[str], message: str) -> None:
    from conftest import TINY_CPU
    from dune_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(TINY_CPU, overrides)
    assert str(err.value).startswith(message)


def test_precision_config_builds_fp32_weights_under_bf16_autocast() -> None:
    from dune_scale.teachers.precision import resolve_teacher_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_teacher_precision("auto", "fp32", cuda) == resolve_teacher_precision("bf16", "fp32", cpu)
    default = resolve_teacher_precision("bf16", "fp32", cpu)
    assert (default.param_dtype, default.compute_dtype, default.fp8) == (torch.float32, torch.bfloat16, False)
    assert resolve_teacher_precision("bf16", "bf16", cpu).param_dtype == torch.bfloat16
    assert resolve_teacher_precision("auto", "fp32", cpu).compute_dtype == torch.float32
    tiny = {"embed_dim": 16, "depth": 1, "num_heads": 2}
    entry = SimpleNamespace(name="dino2reg_vitlarge_14", checkpoint=None, random_init=True, arch=tiny, tokens=[])
    ensemble = build_teacher_ensemble([entry], 14, "cpu", default.compute_dtype, default.param_dtype)
    assert {p.dtype for p in ensemble.parameters()} == {torch.float32}
    out = ensemble(torch.randn(1, 3, 28, 28))["dino2reg_vitlarge_14"]
    assert out["patch"].dtype == torch.float32  # the final LayerNorm of an fp32 residual stream


def test_compiled_teacher_blocks_equal_eager() -> None:
    """teachers.compile: each block compiled in place (token preparation and its caches stay eager);
    features equal eager's, MASt3R's RoPE included (inside the graph the compiler fuses it)."""
    from dune_scale.teachers.precision import compile_frozen_blocks

    torch.manual_seed(0)
    for name, images in (("dino2reg_vitlarge_14", torch.randn(2, 3, 56, 84)), ("mast3r_vitlarge_16", torch.randn(2, 3, 64, 96))):
        arch = {"embed_dim": 32, "depth": 2, "num_heads": 2, **({"img_size": 70} if name.startswith("dino") else {})}
        teacher = build_teacher(name, **arch).requires_grad_(False).eval()
        with torch.no_grad():
            eager = teacher(images)
            compile_frozen_blocks(teacher.blocks)
            compiled = teacher(images)
        assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None for block in teacher.blocks)
        torch.testing.assert_close(compiled["patch"], eager["patch"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled["cls"], eager["cls"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TEACHER_SPECS))
def test_every_block_gets_a_contiguous_residual_stream(name: str) -> None:
    """Elementwise ops keep their first input's layout: a strided residual stream (MASt3R prepends no
    token to the patch embedding's transposed view) would make every LayerNorm copy and every
    residual add run strided, in every block of every forward."""
    spec = TEACHER_SPECS[name]
    arch = {"embed_dim": 32, "depth": 2, "num_heads": 2, **({"img_size": 70} if spec.patch_size == 14 else {})}
    teacher = build_teacher(name, **arch).requires_grad_(False).eval()
    layouts: list[bool] = []
    for block in teacher.blocks:
        block.register_forward_pre_hook(lambda _, args: layouts.append(args[0].is_contiguous()))
    with torch.no_grad():
        teacher(torch.randn(2, 3, 4 * spec.patch_size, 6 * spec.patch_size))
    assert layouts == [True, True]
