"""Export and import of trained students: official DUNE .pth, timm, Hugging Face-style folder,
``load_encoder``, stage-2 initialisation from a released DUNE file, and clear errors for bad input.

The official naver/dune code is not installed (and must not be vendored), so ``official_load``
below rebuilds a model the way its loader does from the saved ``args`` (EncoderOptions /
ProjectorOptions defaults updated by ``enc_args`` / ``proj_args``, ``TEACHER_CFG`` widths and token
types, one ``BlockChunk`` padded by nothing, ``mask_token``, ``projectors.<t>.linear`` with
``scale``, ``teacher_norms.<t>.normalizers.<tok>.mean/std``) and loads the file strictly. Its
blocks are this project's ``Block`` (same parameter names and math as DINOv2's): what is under test
is the key layout, the arguments and the forward wiring of ``get_encoder_output``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import runpy
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import REPO, TINY_CPU, launch_command, launcher_env, tiny_overrides
from dune_scale import load_encoder
from dune_scale.cli.export import main as export_main
from dune_scale.engine.export import StudentSpec, build_student_from, read_student, to_official_dune
from dune_scale.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from dune_scale.models.vit import Block, PatchEmbed
from dune_scale.safe_load import official_training_globals, torch_load

TEACHER_CFG = {  # naver/dune teachers/config.py: num_features and token_types
    "dino2reg_vitlarge_14": (1024, ["cls", "patch"]),
    "mast3r_vitlarge_16": (1024, ["patch"]),
    "multihmr_vitlarge_14_672": (1024, ["patch"]),
}
ENCODER_OPTIONS = {"arch": "vit_base", "image_size": 336, "patch_size": 14, "num_register_tokens": 4, "layerscale_init": 1e-4}
ARCHS = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}
SIZE = 28  # 2×2 patches: a ViT-S forward costs milliseconds


# ----------------------------------------------------------------------- the official loader, rebuilt


class OfficialEncoder(nn.Module):
    """DinoVisionTransformer(block_chunks=1): ``blocks.0.<i>``, ``mask_token``, forward(apply_norm)."""

    def __init__(self, arch: str, image_size: int, patch_size: int, num_register_tokens: int, layerscale_init: float) -> None:
        super().__init__()
        width, depth, heads = ARCHS[arch]
        self.embed_dim, self.num_heads, self.num_register_tokens = width, heads, num_register_tokens
        self.patch_embed = PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch_size) ** 2, width))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, width))
        self.blocks = nn.ModuleList([nn.ModuleList(Block(width, heads, layerscale_init=layerscale_init) for _ in range(depth))])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, width))

    def forward(self, images: torch.Tensor, apply_norm: bool = True) -> dict[str, torch.Tensor]:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # native size
        x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks[0]:
            x = block(x)
        x = self.norm(x) if apply_norm else x
        return {"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, 1 + self.num_register_tokens :]}


class OfficialProjector(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, num_blocks: int, num_heads: int, layerscale_init: float,
                 mlp_ratio: float = 4.0, scale: float = 1.0, **_: object) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(input_dim, num_heads, mlp_ratio, layerscale_init=layerscale_init) for _ in range(num_blocks))
        self.linear = nn.Linear(input_dim, output_dim)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.scale * self.linear(x)


class OfficialNormalizer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))


class OfficialDune(nn.Module):
    def __init__(self, encoder: OfficialEncoder, projectors: nn.ModuleDict, teacher_norms: nn.ModuleDict) -> None:
        super().__init__()
        self.encoder, self.projectors, self.teacher_norms = encoder, projectors, teacher_norms

    def get_encoder_output(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder(images, apply_norm=False)
        return torch.cat([out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]], dim=1)

    def get_projector_output(self, images: torch.Tensor, teacher: str) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.projectors[teacher](self.get_encoder_output(images))
        return out[:, 0], out[:, 1:]


def official_load(path: Path) -> OfficialDune:
    """``load_dune_from_checkpoint``: build from ``ckpt['args']``, strip prefixes, strict load."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # as the official loader reads it
    args = ckpt["args"]
    encoder = OfficialEncoder(**{**ENCODER_OPTIONS, **args.enc_args, "image_size": args.image_size})
    proj_args = {"num_blocks": 1, "num_heads": 12, "layerscale_init": 1e-4, **args.proj_args}
    proj_args["num_heads"] = encoder.num_heads  # build_student_from_args always sets it
    projectors = nn.ModuleDict({t: OfficialProjector(encoder.embed_dim, TEACHER_CFG[t][0], **proj_args) for t in args.teachers})
    norms = nn.ModuleDict(
        {t: nn.ModuleDict({"normalizers": nn.ModuleDict({tok: OfficialNormalizer(TEACHER_CFG[t][0]) for tok in TEACHER_CFG[t][1]})})
         for t in args.teachers}
    )
    model = OfficialDune(encoder, projectors, norms)
    model.load_state_dict({k.replace("module.", "").replace("_orig_mod.", ""): v for k, v in ckpt["model"].items()}, strict=True)
    return model.eval()


# ----------------------------------------------------------------------- fixtures


def vit_small_student(seed: int = 0, image_size: int = SIZE) -> nn.Module:
    """A ViT-S/14 DUNE student with the official teachers, every weight and statistic non-trivial."""
    spec = StudentSpec(384, 12, 6, 14, 4, image_size, 1e-4, {t: d for t, (d, _) in TEACHER_CFG.items()},
                       {t: toks for t, (_, toks) in TEACHER_CFG.items()}, 1, 4.0)
    torch.manual_seed(seed)
    student = spec.build_student()
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if "gamma" in name or "teacher_norms" in name or name.endswith(("cls_token", "register_tokens")):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return student.eval()


@pytest.fixture(scope="module")
def vits_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    student = vit_small_student()
    path = tmp_path_factory.mktemp("vits") / "student.safetensors"
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(path))
    return path, student


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, demo_shards: Path) -> Path:
    """A finished tiny single-process run with checkpoints and validations at steps 2 and 3."""
    from dune_scale.cli.train import train
    from dune_scale.config import load_config

    out = tmp_path_factory.mktemp("tiny") / "run"
    train(load_config(TINY_CPU, tiny_overrides(out, demo_shards, "train.max_steps=3", "checkpoint.every_steps=2",
                                               "eval.every_steps=2", "eval.max_batches=1")))
    return out


def images(size: int = SIZE, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------- official DUNE format


@torch.no_grad()
def test_dune_export_loads_strictly_in_the_official_loader_with_identical_outputs(vits_file, tmp_path: Path) -> None:
    source, student = vits_file
    out = tmp_path / "dune.pth"
    assert export_main([str(source), "--format", "dune", "--out", str(out)]) == 0
    official = official_load(out)
    x = images()
    tokens = official.get_encoder_output(x)
    ours = load_encoder(source).forward_features(x)
    assert torch.equal(ours["cls"], tokens[:, 0]) and torch.equal(ours["patch"], tokens[:, 1:])
    predictions = student(x)
    for teacher in TEACHER_CFG:
        cls, patch = official.get_projector_output(x, teacher)
        assert torch.equal(predictions[teacher]["patch"], patch)
        if "cls" in predictions[teacher]:
            assert torch.equal(predictions[teacher]["cls"], cls)
        for token in TEACHER_CFG[teacher][1]:
            norm = student.teacher_norms[teacher][token]
            assert torch.equal(official.teacher_norms[teacher]["normalizers"][token].std, norm.running_std)


def _official_file(student: nn.Module, path: Path, prefix: str = "", with_args: bool = True, arch: str = "vit_small") -> Path:
    """A file as naver/dune's training writes it (from our reconstruction of its model)."""
    model = {f"{prefix}{k}": v for k, v in to_official_dune(student.state_dict()).items()}
    ckpt = {"model": model, "iter": 1234}
    if with_args:
        ckpt["args"] = argparse.Namespace(image_size=SIZE, enc_args={"arch": arch}, proj_args={}, teachers=sorted(TEACHER_CFG))
    torch.save(ckpt, path)
    return path


@torch.no_grad()
@pytest.mark.parametrize("prefix, with_args", [("", True), ("module.", True), ("module.", False)])
def test_official_files_load_in_every_form(vits_file, tmp_path: Path, prefix: str, with_args: bool) -> None:
    _, student = vits_file
    path = _official_file(student, tmp_path / "released.pth", prefix, with_args)
    weights = read_student(path)
    assert set(weights.state) == set(student.state_dict())
    assert all(torch.equal(weights.state[k], v) for k, v in student.state_dict().items())
    rebuilt = build_student_from(weights)
    x = images()
    assert torch.equal(rebuilt(x)["mast3r_vitlarge_16"]["patch"], student(x)["mast3r_vitlarge_16"]["patch"])
    if with_args:
        assert weights.step == 1234
        # ... and the official loader reads our re-export of it.
        out = tmp_path / "again.pth"
        assert export_main([str(path), "--format", "dune", "--out", str(out)]) == 0
        assert torch.equal(official_load(out).get_encoder_output(x), official_load(path).get_encoder_output(x))


@torch.no_grad()
def test_stage_two_starts_from_a_released_dune_file_at_a_new_resolution(vits_file, tmp_path: Path) -> None:
    from dune_scale.engine.pretrained import load_pretrained_student
    from dune_scale.models.vit import resample_pos_embed

    _, student = vits_file
    path = _official_file(student, tmp_path / "released.pth", "module.")
    stage2 = vit_small_student(seed=5, image_size=42)
    load_pretrained_student(stage2, path)
    loaded, original = stage2.state_dict(), student.state_dict()
    assert torch.equal(loaded["encoder.pos_embed"], resample_pos_embed(original["encoder.pos_embed"], 3, 3))
    for key in ("encoder.blocks.11.mlp.fc2.weight", "projectors.dino2reg_vitlarge_14.head.bias",
                "teacher_norms.multihmr_vitlarge_14_672.patch.running_mean", "encoder.register_tokens"):
        assert torch.equal(loaded[key], original[key])


def official_training_checkpoint(student: nn.Module, path: Path, numpy_1_names: bool = False, **extra_args: object) -> Path:
    """``checkpoint.pth`` as main_dune.py's run_evaluations saves it: the DDP model's state
    (``module.`` keys), AdamW's state after a step whose param groups hold numpy float64 learning
    rates (``args.lr_schedule[it]``), ``iter``, and ``args``: the parsed arguments with their eval'd
    dicts, lists, and the schedules as numpy arrays. ``numpy_1_names``: as numpy 1.x pickles them
    (``numpy.core.multiarray``), by renaming the globals in the archive's data.pkl."""
    from test_official_step import official_cosine_scheduler

    model = {f"module.{k}": v for k, v in to_official_dune(student.state_dict()).items()}
    iters, it = 100, 39
    lr_schedule = official_cosine_scheduler(3e-4 * 1024 / 256.0, 1e-6, epochs=1, niter_per_ep=iters, warmup_epochs=0.2)
    biases = [nn.Parameter(v.clone()) for k, v in model.items() if k.endswith("norm.bias")]
    optimizer = torch.optim.AdamW([{"params": biases[1:]}, {"params": biases[:1], "weight_decay": 0.0}], lr=0,
                                  betas=(0.9, 0.99), eps=1e-15, fused=True)
    for bias in biases:
        bias.grad = torch.ones_like(bias)
    for group in optimizer.param_groups:
        group["lr"] = lr_schedule[it]
    optimizer.step()
    args = argparse.Namespace(
        enc_args={"arch": "vit_small"}, proj_args={"num_heads": 6}, dune_args="{'last_enc_norm':False}", teachers=sorted(TEACHER_CFG),
        tnorm_ema_momentum_start=1.0, tnorm_ema_momentum_end=0.001, tdrop_args={"method": "lowest_loss", "p": 0.5}, pretrained="",
        dataset="teacher_balanced", image_size=SIZE, rrc_scale=[0.4, 1.0], fp16=True, clip_grad=1.0, batch_size_per_gpu=128,
        epochs=100.0, epoch_size=1281167, optim_args={"betas": (0.9, 0.99), "eps": 1e-15, "fused": True}, wd=0.03, lr=3e-4,
        min_lr=1e-6, warmup_epochs=20.0, seed=22, world_size=8, rank=0, gpu=0, batch_size=1024, iters=iters,
        epoch_iters=[20, 40, 60, 80, 100], sep_ckpt_iters=[20], lr_schedule=lr_schedule,
        tnorm_ema_schedule=official_cosine_scheduler(1.0, 0.001, epochs=1, niter_per_ep=iters), **extra_args,
    )
    torch.save({"model": model, "optimizer": optimizer.state_dict(), "iter": it + 1, "args": args}, path)
    if numpy_1_names:
        _rename_pickled_globals(path, b"numpy._core.multiarray", b"numpy.core.multiarray")
    return path


def _rename_pickled_globals(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite a torch archive with ``old`` module names replaced in its data.pkl, every record
    stored uncompressed and 64-byte aligned as torch.save lays them out (loading maps the file)."""
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with open(path, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            if name.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            padding = -(raw.tell() + 30 + len(name.encode()) + 4) % 64  # local header, name, extra-field header
            info.extra = struct.pack("<HH", 0x4246, padding) + bytes(padding)
            archive.writestr(info, data)


@torch.no_grad()
@pytest.mark.parametrize("numpy_1_names", [False, True])
def test_official_training_checkpoints_give_their_student_and_report_the_rest(
    vits_file, tmp_path: Path, numpy_1_names: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from dune_scale.engine.pretrained import load_pretrained_student

    _, student = vits_file
    path = official_training_checkpoint(student, tmp_path / "checkpoint.pth", numpy_1_names)
    assert (b"numpy.core.multiarray" in path.read_bytes()) == numpy_1_names
    with caplog.at_level(logging.WARNING):
        weights = read_student(path)
    assert "at iteration 40 of 100: only its student weights are read (not used: args, optimizer)" in caplog.text
    assert weights.step == 40 and set(weights.state) == set(student.state_dict())
    assert all(torch.equal(weights.state[k], v) for k, v in student.state_dict().items())
    stage2 = copy.deepcopy(student)  # student.pretrained=checkpoint.pth
    for tensor in stage2.state_dict().values():
        tensor.zero_()
    load_pretrained_student(stage2, path)
    assert all(torch.equal(stage2.state_dict()[k], v) for k, v in student.state_dict().items())
    out = tmp_path / "dune.pth"  # launch/export.py checkpoint.pth
    assert export_main([str(path), "--format", "dune", "--out", str(out)]) == 0
    exported = torch_load(out, official_training_globals())["model"]
    expected = to_official_dune(student.state_dict())
    assert set(exported) == set(expected) and all(torch.equal(exported[k], v) for k, v in expected.items())


class _Evaluates:
    """Unpickling this hands ``code`` to a numpy function that runs ``eval`` on it."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple:
        from numpy.f2py.crackfortran import myeval

        return myeval, (self.code,)


def test_a_numpy_function_in_an_official_training_checkpoint_is_refused(capsys, vits_file, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = official_training_checkpoint(vits_file[1], tmp_path / "checkpoint.pth", schedule=_Evaluates(f"__import__('os').system('touch {marker}')"))
    _fails(capsys, [str(path), "--format", "hf", "--out", str(tmp_path / "o")], str(path), "numpy.f2py.crackfortran.myeval", "refusing to unpickle")
    assert not marker.exists()


@torch.no_grad()
def test_dune_export_at_a_resolution_is_what_the_encoder_computes_there(vits_file, tmp_path: Path) -> None:
    """The official loader builds a 42-px model from args and uses its table as stored: the table
    resampled once, at export, as our encoder resamples it for 42-px inputs."""
    source, _ = vits_file
    out = tmp_path / "dune42.pth"
    assert export_main([str(source), "--format", "dune", "--resolution", "42", "--out", str(out)]) == 0
    x = images(42)
    ours = load_encoder(source).forward_features(x)
    tokens = official_load(out).get_encoder_output(x)
    assert torch.equal(tokens[:, 0], ours["cls"]) and torch.equal(tokens[:, 1:], ours["patch"])


# ----------------------------------------------------------------------- timm, hf, torch.hub


@torch.no_grad()
def test_timm_export_gives_timms_features_at_the_native_resolution(vits_file, tiny_run: Path, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    for source, size in ((vits_file[0], SIZE), (tiny_run, 56)):
        out = tmp_path / f"timm_{size}"
        assert export_main([str(source), "--format", "timm", "--out", str(out)]) == 0
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        x = images(size)
        ours = load_encoder(source).vit.forward_features(x)  # with the final norm, as timm's
        theirs = model.forward_features(x)
        assert torch.equal(theirs[:, 0], ours["cls"]) and torch.equal(theirs[:, 5:], ours["patch"])
        assert torch.equal(load_encoder(out).forward_features(x)["patch"], load_encoder(source).forward_features(x)["patch"])
    config = json.loads((tmp_path / f"timm_{SIZE}" / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_reg4_dinov2"
    assert (config["pretrained_cfg"]["mean"], config["pretrained_cfg"]["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    direct = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=SIZE, num_classes=0)
    direct.load_state_dict(load_file(str(tmp_path / f"timm_{SIZE}" / "model.safetensors")), strict=True)


@torch.no_grad()
def test_timm_folder_runs_at_other_sizes(vits_file, tmp_path: Path) -> None:
    """timm resamples the positional table itself (its rule, close to ours, not equal)."""
    timm = pytest.importorskip("timm")
    out = tmp_path / "timm"
    assert export_main([str(vits_file[0]), "--format", "timm", "--out", str(out)]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    for height, width in ((42, 42), (42, 70)):
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height + width))
        theirs = model.forward_features(x)[:, 5:]
        ours = load_encoder(vits_file[0]).vit.forward_features(x)["patch"]
        assert theirs.shape == ours.shape == (2, (height // 14) * (width // 14), 384)
        assert torch.nn.functional.cosine_similarity(theirs, ours, dim=-1).min() > 0.9


@torch.no_grad()
def test_hf_folder_has_a_card_and_loads_through_torch_hub(vits_file, tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf_vits"
    assert export_main([str(vits_file[0]), "--format", "hf", "--out", str(out)]) == 0
    hub = torch.hub.load(str(out), "dune_vits14", source="local")
    x = images()
    assert torch.equal(hub.forward_features(x)["patch"], load_encoder(vits_file[0]).forward_features(x)["patch"])
    assert not hub.training
    run_out = tmp_path / "hf_tiny"
    assert export_main([str(tiny_run), "--format", "hf", "--out", str(run_out)]) == 0
    card = (run_out / "README.md").read_text()
    assert "trained 3 steps" in card and "random init" in card and "synth_mast3r" in card
    assert "| synth_dino2 | dino2 | " in card and "| ? |" not in card  # sizes read from the shards' index
    # A custom shape's entry is named after it too; dune_encoder is every folder's alias (what
    # torch.hub.list counts as entries: the hubconf's public callables).
    hubconf = runpy.run_path(str(run_out / "hubconf.py"))
    assert {name for name, value in hubconf.items() if callable(value) and not name.startswith("_")} == {
        "dune_vit_w48_d2_h4_p14", "dune_encoder"}
    for entry in ("dune_vit_w48_d2_h4_p14", "dune_encoder"):
        assert torch.equal(torch.hub.load(str(run_out), entry, source="local").forward_features(images(56))["cls"],
                           load_encoder(tiny_run).forward_features(images(56))["cls"])


def test_model_card_tells_what_the_run_did(tiny_run: Path, tmp_path: Path) -> None:
    """Steps, images and validation as the run recorded them, up to the exported step; the
    schedule the run followed (tiny_cpu: train.total_steps=60, not the base recipe's 100 epochs)."""
    import hashlib
    import shutil

    import yaml

    from dune_scale.engine.export import model_card
    from dune_scale.telemetry.metrics import read_metrics

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    teacher_file = tmp_path / "dino.safetensors"
    teacher_file.write_bytes(b"not really weights")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["teachers"]["models"][0].update(checkpoint=str(teacher_file), random_init=False)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    card = model_card(read_student(run / "student.safetensors"))
    assert hashlib.sha256(b"not really weights").hexdigest() in card
    assert "trained 3 steps, 36 images (global batch 12), of a 60-step schedule (train.total_steps); stopped before its end" in card
    assert "epochs" not in card
    validations = {(r["step"], r["dataset"]): r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"}
    assert {step for step, _ in validations} == {2, 3}
    for step, source in ((3, run / "student.safetensors"), (2, run / "checkpoints" / "step_000000002")):
        card = model_card(read_student(source))
        assert f"- step {step}\n" in card and f"trained {step} steps" in card
        for dataset in ("all", "synth_dino2"):
            record = validations[step, dataset]
            teachers = " | ".join(f"{record[f'loss_{t}']:.4f}" for t in ("dino2reg_vitlarge_14", "mast3r_vitlarge_16", "multihmr_vitlarge_14_672"))
            assert f"| {dataset} | {record['images']} | {record['loss']:.4f} | {teachers} |" in card, card


# ----------------------------------------------------------------------- every strategy's checkpoints


@torch.no_grad()
def test_single_checkpoints_and_weights_give_the_same_encoder(tiny_run: Path) -> None:
    x = images(56)
    final = load_encoder(tiny_run).forward_features(x)
    for source in (tiny_run / "student.safetensors", tiny_run / "checkpoints", tiny_run / "checkpoints" / "step_000000003"):
        assert torch.equal(load_encoder(source).forward_features(x)["patch"], final["patch"])
    assert read_student(tiny_run).step == 3
    assert not torch.equal(load_encoder(tiny_run / "checkpoints" / "step_000000002").forward_features(x)["patch"], final["patch"])


# FSDP and ZeRO-2/3 checkpoints read without their world size and exported: test_distributed's
# strategy runs (one launch each checks training, resume and export).


# ----------------------------------------------------------------------- bad input


def _fails(capsys: pytest.CaptureFixture, argv: list[str], *expected: str) -> None:
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err


def test_a_teacher_checkpoint_given_as_student_is_named(capsys, tmp_path: Path) -> None:
    from dune_scale.teachers import build_teacher, convert_teacher

    dinov2 = build_teacher("dino2reg_vitlarge_14", embed_dim=32, depth=1, num_heads=2, img_size=28)
    release = tmp_path / "dinov2_vitl14_reg4_pretrain.pth"
    torch.save(dinov2.state_dict(), release)
    _fails(capsys, [str(release), "--format", "hf", "--out", str(tmp_path / "o")], str(release), "a DINOv2 release", "not a DUNE student")
    multihmr = tmp_path / "multiHMR_672_L.pt"
    torch.save({"model_state_dict": {f"backbone.encoder.{k}": v for k, v in dinov2.state_dict().items()}}, multihmr)
    _fails(capsys, [str(multihmr), "--format", "hf", "--out", str(tmp_path / "o")], str(multihmr), "a Multi-HMR training checkpoint")
    weights, _ = convert_teacher("dino2reg_vitlarge_14", release, tmp_path / "converted", embed_dim=32, depth=1, num_heads=2, img_size=28)
    _fails(capsys, [str(weights), "--format", "hf", "--out", str(tmp_path / "o")], str(weights), "teacher checkpoint")


def test_truncated_files_are_named(capsys, vits_file, tmp_path: Path) -> None:
    source, student = vits_file
    pth = _official_file(student, tmp_path / "released.pth")
    for path in (pth, source):
        cut = tmp_path / f"cut_{path.name}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        _fails(capsys, [str(cut), "--format", "timm", "--out", str(tmp_path / "o")], str(cut), "truncated or corrupt")


def test_unknown_architectures_are_named(capsys, vits_file, tiny_run: Path, tmp_path: Path) -> None:
    pth = _official_file(vits_file[1], tmp_path / "huge.pth", arch="vit_huge")
    _fails(capsys, [str(pth), "--format", "hf", "--out", str(tmp_path / "o")], str(pth), "'vit_huge' is unknown", "vit_small")
    _fails(capsys, [str(tiny_run), "--format", "dune", "--out", str(tmp_path / "o.pth")], "custom student", "--format hf")
    bare = tmp_path / "custom.safetensors"  # a custom width with no config beside it: heads unknown
    save_file(load_file(str(tiny_run / "student.safetensors")), str(bare))
    _fails(capsys, [str(bare), "--format", "hf", "--out", str(tmp_path / "o")], str(bare), "head count")


def test_sizes_and_options_that_cannot_work_are_named(capsys, vits_file, tmp_path: Path) -> None:
    source = vits_file[0]
    out = str(tmp_path / "out")
    _fails(capsys, [str(source), "--format", "hf", "--resolution", "42x70", "--out", out], "42x70", "square", "--format onnx")
    _fails(capsys, [str(source), "--format", "onnx", "--resolution", "40", "--out", out], "40x40", "multiple of the patch size 14")
    _fails(capsys, [str(source), "--format", "onnx", "--dynamic", "--resolution", "42", "--out", out], "--dynamic", "--resolution")
    for argv, message in ((["--format", "timm", "--with-onnx"], "--with-onnx adds model.onnx to an hf folder"),
                          (["--format", "dune", "--dynamic"], "--dynamic is for ONNX graphs"),
                          (["--format", "onnx", "--resolution", "4x"], "is not H or HxW")):
        with pytest.raises(SystemExit) as stop:
            export_main([str(source), *argv, "--out", out])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_existing_out_is_replaced_only_with_force(capsys, vits_file, tmp_path: Path) -> None:
    out = tmp_path / "dune.pth"
    assert export_main([str(vits_file[0]), "--format", "dune", "--out", str(out)]) == 0
    written = out.read_bytes()
    _fails(capsys, [str(vits_file[0]), "--format", "dune", "--resolution", "42", "--out", str(out)], str(out), "exists", "--force")
    assert out.read_bytes() == written
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    _fails(capsys, [str(vits_file[0]), "--format", "hf", "--out", str(folder)], str(folder), "a folder of that name exists")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert export_main([str(vits_file[0]), "--format", "dune", "--resolution", "42", "--out", str(out), "--force"]) == 0
    assert official_load(out).encoder.pos_embed.shape[1] == 1 + 3 * 3
    assert export_main([str(vits_file[0]), "--format", "hf", "--out", str(folder), "--force"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "hubconf.py", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dune.pth", "hf"]  # no partial output left beside


@pytest.mark.parametrize("content", ["text", "plain pickle"])
def test_a_file_that_is_no_checkpoint_is_named_without_unsafe_advice(capsys, monkeypatch, tmp_path: Path, content: str) -> None:
    """Through launch/export.py, as a user runs it (in this process)."""
    import pickle

    path = tmp_path / "weights.pt"
    if content == "text":
        path.write_text("these are my notes\n")
    else:
        path.write_bytes(pickle.dumps({"encoder.cls_token": [0.0, 1.0]}, protocol=4))
    monkeypatch.setattr("sys.argv", ["export.py", str(path), "--format", "hf", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "launch" / "export.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {path}: ") and len(err.strip().splitlines()) == 1, err
    assert "expected a DUNE student" in err and "weights_only" not in err and "will likely succeed" not in err, err


def test_launch_script_runs_as_a_program(vits_file, tmp_path: Path) -> None:
    out = tmp_path / "dune.pth"
    command = launch_command("python", 1, REPO / "launch" / "export.py", str(vits_file[0]), "--format", "dune", "--out", str(out))
    result = subprocess.run(command, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert official_load(out).encoder.num_heads == 6


class NotAllowListed:
    """A class a malicious or foreign checkpoint could pickle."""


def test_pickled_objects_other_than_the_args_namespace_are_refused(capsys, vits_file, tmp_path: Path) -> None:
    path = _official_file(vits_file[1], tmp_path / "released.pth")
    ckpt = torch.load(path, weights_only=False)
    ckpt["extra"] = NotAllowListed()
    torch.save(ckpt, path)
    _fails(capsys, [str(path), "--format", "hf", "--out", str(tmp_path / "o")], str(path), "NotAllowListed", "refusing to unpickle")
