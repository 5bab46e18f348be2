"""The trained student in the formats people load, and back: one reader for every source, one
writer per target format, one filter function per foreign key layout.

Our layout (``DuneStudent.state_dict()``) is the hub: every source is read into it
(:func:`read_student`) and every format is written from it. Sources: a run folder (its latest
complete checkpoint, else ``student.safetensors``; a run of several students needs the student's
name, or its folder ``students/<name>`` as the source), a checkpoints root, one checkpoint folder of any
strategy (``model.pt``; FSDP's DCP folder; DeepSpeed ZeRO-1/2/3 shards, whatever world size wrote
them), ``student.safetensors`` (or any of our weights files), an official DUNE ``.pth``, and the
folders :func:`write_hf` / :func:`write_timm` produce. Nothing is unpickled but tensors and, in
official ``.pth`` files, their ``argparse.Namespace`` of training arguments and, in official
training checkpoints (``checkpoint.pth``), the numpy arrays and scalars those hold.
``--resolution`` resamples the positional table once, at export (:func:`at_resolution`); the ONNX
writer lives in :mod:`dune_scale.engine.onnx_export`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dune_scale.config import STUDENTS_FOLDER, resolve_student_dicts, student_subdir
from dune_scale.data.transforms import ValTransform
from dune_scale.distill.student import DuneStudent
from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpoint_files import CheckpointError, deepspeed_loads, read_dcp_keys, read_torch_file
from dune_scale.engine.checkpointer import LATEST, MANIFEST, Checkpointer, is_complete, read_trainer_state
from dune_scale.eval.results import run_results_lines
from dune_scale.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from dune_scale.models.vit import VisionTransformer, pos_embed_for_grid
from dune_scale.safe_load import UnreadableCheckpoint, official_training_globals, torch_load
from dune_scale.teachers.registry import TEACHER_SPECS

# The named students: (width, depth, heads). Heads cannot be read from weights; the width names them.
NAMED_ARCHS = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}
TIMM_NAMES = {
    "vit_small": "vit_small_patch14_reg4_dinov2",
    "vit_base": "vit_base_patch14_reg4_dinov2",
    "vit_large": "vit_large_patch14_reg4_dinov2",
}
HUB_ENTRY = {"vit_small": "dune_vits14", "vit_base": "dune_vitb14", "vit_large": "dune_vitl14"}
STUDENT_WEIGHTS = "student.safetensors"
HF_WEIGHTS, HF_CONFIG, HF_CARD, HF_HUBCONF = "model.safetensors", "config.json", "README.md", "hubconf.py"
HF_ONNX = "model.onnx"
FORMATS = ("dune", "timm", "hf", "onnx")
# Wrappers that training may leave in key names (DDP/DeepSpeed, torch.compile, activation checkpointing).
_WRAPPER_PARTS = re.compile(r"(^|\.)(module|_orig_mod|_checkpoint_wrapped_module)\.")


log = logging.getLogger(__name__)


class StudentFileError(ValueError):
    """A source that is not a usable DUNE student, or a format it cannot be written to (named)."""


@dataclass(frozen=True)
class StudentSpec:
    """Everything needed to rebuild the student from its weights (recorded in exported folders)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    num_register_tokens: int
    image_size: int
    layerscale_init: float
    teacher_dims: dict[str, int]
    teacher_tokens: dict[str, list[str]]
    projector_depth: int
    projector_mlp_ratio: float

    @property
    def arch(self) -> str:
        """``vit_small`` / ``vit_base`` / ``vit_large`` when the shapes are those, else ``custom``."""
        for name, shape in NAMED_ARCHS.items():
            if shape == (self.embed_dim, self.depth, self.num_heads):
                return name
        return "custom"

    def build_encoder(self) -> VisionTransformer:
        return VisionTransformer(
            img_size=self.image_size, patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
            num_heads=self.num_heads, num_register_tokens=self.num_register_tokens, layerscale_init=self.layerscale_init,
        )

    def build_student(self) -> DuneStudent:
        return DuneStudent(
            self.build_encoder(), self.teacher_dims, self.teacher_tokens,
            projector_depth=self.projector_depth, projector_mlp_ratio=self.projector_mlp_ratio,
            projector_layerscale_init=self.layerscale_init,
        )


@dataclass
class StudentWeights:
    """A student read from any source: weights in our layout and where they came from. The spec is
    worked out on first use (stage-2 initialisation needs the weights only)."""

    state: dict[str, torch.Tensor]
    source: Path
    step: int | None = None
    config: dict[str, Any] | None = None  # the run's resolved config, when the source has one
    run_dir: Path | None = None
    num_heads: int | None = None
    recorded_spec: StudentSpec | None = None  # as an exported folder records it
    resampled_from: int | None = None  # the training size, when the table was resampled at export

    @functools.cached_property
    def spec(self) -> StudentSpec:
        if self.recorded_spec is not None:
            return self.recorded_spec
        return spec_from_state(self.state, self.num_heads or _heads_from_config(self.config), self.source)


class DuneEncoder(nn.Module):
    """The encoder as DUNE trains and releases it, for downstream use.

    ``forward_features`` (ImageNet-normalised images) gives ``cls`` (B, D), ``patch`` (B, N, D) and
    ``reg`` (B, R, D) *before* the final LayerNorm, exactly DUNE's ``get_encoder_output``; the norm
    stays available as ``vit.norm``. ``preprocess`` maps a uint8 (3, H, W) image to the model input
    (shorter side resized to ``image_size``·256/224, centre crop, ImageNet normalisation).
    """

    def __init__(self, vit: VisionTransformer, image_size: int) -> None:
        super().__init__()
        self.vit = vit
        self.image_size = image_size
        self.patch_size = vit.patch_size
        self.embed_dim = vit.embed_dim
        self.preprocess = ValTransform(image_size)

    @classmethod
    def from_weights(cls, weights: StudentWeights) -> DuneEncoder:
        vit = weights.spec.build_encoder()
        encoder_state = {k[len("encoder.") :]: v for k, v in weights.state.items() if k.startswith("encoder.")}
        _load_strict(vit, encoder_state, weights.source)
        return cls(vit, weights.spec.image_size).eval()

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        tokens = self.vit.forward_tokens(images)
        prefix = self.vit.num_prefix_tokens
        return {"cls": tokens[:, 0], "patch": tokens[:, prefix:], "reg": tokens[:, 1:prefix] if prefix > 1 else None}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return self.forward_features(images)


# ------------------------------------------------------------------------------------- spec


def spec_from_state(state: dict[str, torch.Tensor], num_heads: int | None, source: Path) -> StudentSpec:
    """Read the architecture off the weights; only the head count needs ``num_heads`` (or a named width)."""
    for key in ("encoder.pos_embed", "encoder.patch_embed.proj.weight", "encoder.blocks.0.norm1.weight"):
        if key not in state:
            raise StudentFileError(f"{source}: no {key} in its weights; expected a DUNE student (ViT encoder + projectors)")
    embed_dim = state["encoder.pos_embed"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.blocks\.(\d+)\.", k)))
    if num_heads is None:
        named = [heads for dim, d, heads in NAMED_ARCHS.values() if (dim, d) == (embed_dim, depth)]
        if not named:
            raise StudentFileError(
                f"{source}: a custom architecture (width {embed_dim}, {depth} blocks) whose head count is not recorded; "
                "export it from its run folder (config.yaml) or a checkpoint folder"
            )
        num_heads = named[0]
    patch = state["encoder.patch_embed.proj.weight"].shape[-1]
    grid = state["encoder.pos_embed"].shape[1] - 1
    teachers = sorted({k.split(".")[1] for k in state if k.startswith("projectors.")})
    mlp = state.get(f"projectors.{teachers[0]}.blocks.0.mlp.fc1.weight") if teachers else None
    return StudentSpec(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch,
        num_register_tokens=state["encoder.register_tokens"].shape[1] if "encoder.register_tokens" in state else 0,
        image_size=round(grid**0.5) * patch,
        layerscale_init=1e-4,  # only decides that layer scales exist; their values are in the weights
        teacher_dims={t: state[f"projectors.{t}.head.weight"].shape[0] for t in teachers},
        teacher_tokens={t: [tok for tok in ("cls", "patch") if f"teacher_norms.{t}.{tok}.running_mean" in state] for t in teachers},
        projector_depth=len({k.split(".")[3] for k in state if k.startswith(f"projectors.{teachers[0]}.blocks.")}) if teachers else 1,
        projector_mlp_ratio=mlp.shape[0] / embed_dim if mlp is not None else 4.0,
    )


def _heads_from_config(config: dict[str, Any] | None) -> int | None:
    student = (config or {}).get("student", {})
    if student.get("arch") in NAMED_ARCHS:
        return NAMED_ARCHS[student["arch"]][2]
    return student.get("num_heads")


# ------------------------------------------------------------------------------------- layouts


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` / ``_checkpoint_wrapped_module.`` wherever they sit in a key."""
    return {_WRAPPER_PARTS.sub(r"\1", k): v for k, v in state.items()}


def from_official_dune(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DUNE model state (``BlockChunk`` ``encoder.blocks.<chunk>.<i>.``, ``mask_token``,
    ``projectors.<t>.linear``, ``teacher_norms.<t>.normalizers.<tok>.mean/std``) → our layout."""
    out: dict[str, torch.Tensor] = {}
    scales = {k.split(".")[1]: v for k, v in state.items() if re.fullmatch(r"projectors\.[^.]+\.scale", k)}
    for key, value in state.items():
        if key == "encoder.mask_token" or key in (f"projectors.{t}.scale" for t in scales):
            continue
        key = re.sub(r"^encoder\.blocks\.\d+\.(\d+)\.", r"encoder.blocks.\1.", key)
        projector = re.match(r"projectors\.([^.]+)\.linear\.(weight|bias)$", key)
        if projector:
            name, part = projector.groups()
            key = f"projectors.{name}.head.{part}"
            if name in scales:  # a learnt output scale (projector scale=0): folded into the linear map
                value = value * scales[name].to(value.dtype)
        key = re.sub(r"^teacher_norms\.([^.]+)\.normalizers\.([^.]+)\.mean$", r"teacher_norms.\1.\2.running_mean", key)
        key = re.sub(r"^teacher_norms\.([^.]+)\.normalizers\.([^.]+)\.std$", r"teacher_norms.\1.\2.running_std", key)
        out[key] = value
    return out


def to_official_dune(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout → the official DUNE model state (one ``BlockChunk``, a zero ``mask_token``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"^encoder\.blocks\.(\d+)\.", r"encoder.blocks.0.\1.", key)
        key = re.sub(r"^projectors\.([^.]+)\.head\.", r"projectors.\1.linear.", key)
        key = re.sub(r"^teacher_norms\.([^.]+)\.([^.]+)\.running_mean$", r"teacher_norms.\1.normalizers.\2.mean", key)
        key = re.sub(r"^teacher_norms\.([^.]+)\.([^.]+)\.running_std$", r"teacher_norms.\1.normalizers.\2.std", key)
        out[key] = value
    width = state["encoder.pos_embed"].shape[-1]
    out["encoder.mask_token"] = torch.zeros(1, width, dtype=state["encoder.pos_embed"].dtype)
    return out


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder → timm's ``vit_*_patch14_reg4_dinov2`` (``no_embed_class``: the class position is
    folded into ``cls_token``, registers become ``reg_token``, ``pos_embed`` covers patches only)."""
    encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    pos = encoder.pop("pos_embed")
    out = {"cls_token": encoder.pop("cls_token") + pos[:, :1], "pos_embed": pos[:, 1:].contiguous()}
    if "register_tokens" in encoder:
        out["reg_token"] = encoder.pop("register_tokens")
    out.update(encoder)
    return out


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ``vit_*_reg4_dinov2`` weights → our encoder (a zero class position keeps the features)."""
    encoder = dict(state)
    pos = encoder.pop("pos_embed")
    out = {"encoder.pos_embed": torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1), "encoder.cls_token": encoder.pop("cls_token")}
    if "reg_token" in encoder:
        out["encoder.register_tokens"] = encoder.pop("reg_token")
    out.update({f"encoder.{k}": v for k, v in encoder.items() if not k.startswith("head.")})
    return out


# ------------------------------------------------------------------------------------- reading


def _torch_load(path: Path) -> Any:
    """``weights_only=True`` with the classes of official DUNE files allow-listed one by one: the
    ``args`` Namespace, and the numpy arrays and scalars of training checkpoints."""
    try:
        return torch_load(path, official_training_globals())
    except UnreadableCheckpoint as err:
        raise StudentFileError(f"{path}: {err}") from None


def _teacher_layout(raw: Any) -> str | None:
    """Which teacher checkpoint ``raw`` is, if it is one (so a swapped file gets a clear error)."""
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("model_state_dict"), dict):
        return "a Multi-HMR teacher checkpoint"
    model = raw.get("model")
    if isinstance(model, dict) and any(str(k).startswith(("enc_blocks.", "module.enc_blocks.")) for k in model):
        return "a MASt3R teacher checkpoint"
    if "mask_token" in raw and "cls_token" in raw:
        return "a DINOv2 teacher release"
    return None


def _official_arg(args: argparse.Namespace | dict[str, Any], name: str) -> Any:
    """One training argument of an official file (its ``args``: a Namespace, or a dict)."""
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


def _report_official_training_checkpoint(path: Path, raw: dict[str, Any]) -> None:
    """Names what an official training checkpoint (main_dune.py's ``checkpoint.pth``: ``model``,
    ``optimizer``, ``iter``, ``args``) holds besides the student, none of which is used (a warning:
    shown by every program without logging set up)."""
    if "optimizer" not in raw:
        return
    iters = _official_arg(raw["args"], "iters")
    unused = ", ".join(sorted(str(key) for key in raw if key not in ("model", "iter")))
    log.warning("%s: an official DUNE training checkpoint at iteration %s of %s: only its student weights are read "
                "(not used: %s)", path, raw.get("iter"), iters, unused)


def _state_from_torch_file(path: Path) -> tuple[dict[str, torch.Tensor], int | None, int | None]:
    """(our-layout state, step, heads) of a ``.pt``/``.pth``: official DUNE or our weights."""
    raw = _torch_load(path)
    teacher = _teacher_layout(raw)
    if teacher:
        raise StudentFileError(f"{path}: this is {teacher}, not a DUNE student; give a student run, checkpoint or weights file")
    if isinstance(raw, dict) and isinstance(raw.get("args"), (argparse.Namespace, dict)) and isinstance(raw.get("model"), dict):
        enc_args = _official_arg(raw["args"], "enc_args") or {}
        arch = enc_args.get("arch", "vit_base")
        if arch not in NAMED_ARCHS:
            raise StudentFileError(f"{path}: args.enc_args arch {arch!r} is unknown; known: {', '.join(NAMED_ARCHS)}")
        state = _check_tensors(path, from_official_dune(strip_wrappers(raw["model"])))
        _report_official_training_checkpoint(path, raw)
        return state, raw.get("iter"), NAMED_ARCHS[arch][2]
    for key in ("model", "state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    state = strip_wrappers(_check_tensors(path, raw))
    if any(re.match(r"encoder\.blocks\.\d+\.\d+\.", k) for k in state):  # official layout without args
        state = from_official_dune(state)
    return state, None, None


def _check_tensors(path: Path, state: Any) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StudentFileError(f"{path}: does not hold a state dict of tensors")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            teacher = json.loads(meta.read_text()).get("teacher")
        except ValueError:
            teacher = None
        if teacher:
            raise StudentFileError(f"{path}: this is a converted {teacher} teacher checkpoint ({meta.name}), not a DUNE student")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise StudentFileError(f"{path}: cannot be read (truncated or corrupt safetensors?): {err}") from None


def _read_checkpoint_folder(
    folder: Path, student: str | None
) -> tuple[dict[str, torch.Tensor], int | None, dict[str, Any] | None]:
    """(state, step, config) of one student in one checkpoint folder, whatever strategy wrote it."""
    if not is_complete(folder):
        raise StudentFileError(f"{folder}: checkpoint is incomplete or corrupt (its {MANIFEST} manifest does not match)")
    try:
        return _read_checkpoint_files(folder, student)
    except CheckpointError as err:  # a file that cannot be read safely, named
        raise StudentFileError(str(err)) from None


def _read_checkpoint_files(
    folder: Path, student: str | None
) -> tuple[dict[str, torch.Tensor], int | None, dict[str, Any] | None]:
    trainer = read_trainer_state(folder)
    step, config = trainer["progress"]["step"], trainer["run"]["config"]
    name, config = _student_config(config, student, folder)
    weights = folder / student_subdir(name)
    if (weights / "model.pt").is_file():
        state = _check_tensors(weights / "model.pt", read_torch_file(weights / "model.pt"))
    elif (weights / "fsdp").is_dir():
        state = _read_dcp(weights / "fsdp")
    elif (weights / "deepspeed").is_dir():
        state = _read_zero(weights, "deepspeed")
    else:
        raise StudentFileError(f"{weights}: checkpoint holds neither model.pt, fsdp/ nor deepspeed/ weights")
    return strip_wrappers({k: v.detach().cpu() for k, v in state.items()}), step, config


def _student_config(config: dict[str, Any] | None, student: str | None, source: Path) -> tuple[str, dict[str, Any] | None]:
    """(name, resolved configuration) of the student to read from a run whose config is ``config``:
    a run of several students needs ``student`` to be one of them; a single-student run, none."""
    if config is None:
        return student or "", None
    resolved = dict(resolve_student_dicts(config))
    names = [name for name in resolved if name]
    if not names and student:
        raise StudentFileError(f"{source}: this run trained one student; leave out the student name ({student!r})")
    if names and student not in resolved:
        given = f"{student!r} is not one of them" if student else "say which"
        raise StudentFileError(
            f"{source}: this run trained several students ({', '.join(names)}); {given} "
            "(--student NAME, or the student's folder students/NAME of the run as the source)"
        )
    return student or "", resolved[student or ""]


def _read_dcp(folder: Path) -> dict[str, torch.Tensor]:
    """The ``model`` entry of an FSDP DCP checkpoint, merged in this process (no process group)."""
    return read_dcp_keys(folder, {"model"})["model"]


def _read_zero(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of DeepSpeed ZeRO-1/2/3 shards, whatever world size wrote them."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise StudentFileError(f"{folder}: DeepSpeed ZeRO shards; reading them needs the deepspeed package") from None
    # Its progress report is not ours to print.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), deepspeed_loads():
        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag))
    # ZeRO-1/2 merges only trainable parameters; the frozen final norm is whole in the module file.
    module_file = folder / tag / "mp_rank_00_model_states.pt"
    if module_file.is_file():
        module = read_torch_file(module_file)["module"]
        state.update({k: v for k, v in module.items() if k not in state})
    return state


def _read_config_yaml(path: Path) -> dict[str, Any] | None:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def read_student(source: str | Path, student: str | None = None) -> StudentWeights:
    """Any student source (see the module docstring) → :class:`StudentWeights` in our layout;
    ``student``: which one, for a run or checkpoint of several students."""
    path = Path(source)
    if not path.exists():
        raise StudentFileError(f"{path}: not found")
    if path.is_dir() and path.parent.name == STUDENTS_FOLDER and (path.parent.parent / "config.yaml").is_file():
        if student not in (None, path.name):
            raise StudentFileError(f"{path}: this is student {path.name!r}'s folder, not {student!r}'s")
        return read_student(path.parent.parent, path.name)  # a student's folder in a run of several
    step: int | None = None
    config: dict[str, Any] | None = None
    run_dir: Path | None = None
    heads: int | None = None
    if path.is_dir() and (path / HF_CONFIG).is_file():
        return _read_exported_folder(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        run_dir = path
        path = path / "checkpoints"
    if path.is_dir() and (path / LATEST).exists():
        latest = _latest_complete(path)
        path = latest if latest is not None else path
    if path.is_dir() and (path / MANIFEST).exists():
        state, step, config = _read_checkpoint_folder(path, student)
        run_dir = run_dir or (path.parent.parent if (path.parent.parent / "config.yaml").is_file() else None)
    elif path.is_dir() and (path / STUDENT_WEIGHTS).is_file():
        path = path / STUDENT_WEIGHTS
        state = _read_safetensors(path)
    elif path.is_dir() and run_dir is not None:
        name, config = _student_config(_read_config_yaml(run_dir / "config.yaml"), student, run_dir)
        path = run_dir / student_subdir(name) / STUDENT_WEIGHTS
        if not path.is_file():
            raise StudentFileError(f"{run_dir}: neither a complete checkpoint nor {path.relative_to(run_dir)}")
        state = _read_safetensors(path)
    elif path.is_dir():
        raise StudentFileError(
            f"{path}: expected a run folder, a checkpoint folder, student.safetensors, an official DUNE .pth or an exported folder"
        )
    elif path.suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        state, step, heads = _state_from_torch_file(path)
    if path.is_file() and run_dir is None and (path.parent / "config.yaml").is_file():
        run_dir = path.parent
    if config is None and run_dir is not None:
        _, config = _student_config(_read_config_yaml(run_dir / "config.yaml"), student, run_dir)
    state = dict(state)
    if not any(k.startswith("encoder.") for k in state):
        state = {f"encoder.{k}": v for k, v in state.items()}  # the encoder alone
    state.pop("encoder.mask_token", None)
    return StudentWeights(state, path, step, config, run_dir, num_heads=heads)


def _latest_complete(root: Path) -> Path | None:
    try:
        return Checkpointer(root, keep_last=1, every_steps=1, dist=DistInfo()).find_latest()
    except CheckpointError as err:
        raise StudentFileError(str(err)) from None


def _read_exported_folder(folder: Path) -> StudentWeights:
    """A folder :func:`write_hf` (``dune_scale`` spec) or :func:`write_timm` (``architecture``) wrote."""
    config = json.loads((folder / HF_CONFIG).read_text())
    weights = folder / HF_WEIGHTS
    if not weights.is_file():
        raise StudentFileError(f"{folder}: {HF_CONFIG} is there but {HF_WEIGHTS} is missing")
    state = _read_safetensors(weights)
    if "dune_scale" in config:
        spec = StudentSpec(**config["dune_scale"]["spec"])
        return StudentWeights(state, weights, config["dune_scale"].get("step"), recorded_spec=spec)
    if "architecture" in config:
        state = from_timm(state)
        args = config.get("model_args", {})
        heads = args.get("num_heads") or NAMED_ARCHS[_timm_arch(config["architecture"], folder)][2]
        return StudentWeights(state, weights, num_heads=heads)
    raise StudentFileError(f"{folder / HF_CONFIG}: neither a dune_scale export nor a timm model config")


def _timm_arch(name: str, folder: Path) -> str:
    for arch, timm_name in TIMM_NAMES.items():
        if timm_name == name:
            return arch
    raise StudentFileError(f"{folder / HF_CONFIG}: architecture {name!r} is unknown; known: {', '.join(TIMM_NAMES.values())}")


def load_encoder(source: str | Path, student: str | None = None) -> DuneEncoder:
    """The encoder of any student source, in eval mode (see :class:`DuneEncoder`); ``student``
    names one of several students of a run."""
    return DuneEncoder.from_weights(read_student(source, student))


def build_student_from(weights: StudentWeights) -> nn.Module:
    """The full student (encoder, projectors, teacher norms) with its weights, strictly."""
    student = weights.spec.build_student()
    _load_strict(student, weights.state, weights.source)
    return student.eval()


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        problem = (f"lacks {missing[0]}" if missing else f"has unexpected {unexpected[0]}" if unexpected
                   else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise StudentFileError(f"{source}: does not fit the architecture its weights describe: {problem}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# ------------------------------------------------------------------------------------- writing


def check_resolution(resolution: tuple[int, int], patch_size: int) -> tuple[int, int]:
    height, width = resolution
    if min(height, width) < 1 or height % patch_size or width % patch_size:
        raise StudentFileError(f"--resolution {height}x{width}: each side must be a positive multiple of the patch size {patch_size}")
    return height, width


def at_resolution(weights: StudentWeights, resolution: tuple[int, int] | None) -> StudentWeights:
    """``weights`` made for ``resolution`` (H, W) inputs: the positional table resampled once, by
    the rule the encoder applies at that size, and that size recorded as the student's. The
    formats that store a square table (dune, timm, hf) take square sizes only."""
    spec = weights.spec
    if resolution is None or resolution == (spec.image_size, spec.image_size):
        return weights
    height, width = check_resolution(resolution, spec.patch_size)
    if height != width:
        raise StudentFileError(f"--resolution {height}x{width}: this format stores a square positional table; "
                               "a non-square size is for --format onnx")
    with torch.device("meta"):
        vit = spec.build_encoder()  # for its resampling settings only
    grid = height // spec.patch_size
    state = dict(weights.state)
    state["encoder.pos_embed"] = pos_embed_for_grid(state["encoder.pos_embed"], grid, grid, vit.interpolate_offset,
                                                    vit.interpolate_antialias)
    return dataclasses.replace(weights, state=state, recorded_spec=dataclasses.replace(spec, image_size=height),
                               resampled_from=spec.image_size)


def _official_arch(weights: StudentWeights) -> str:
    arch = weights.spec.arch
    if arch == "custom" or weights.spec.patch_size != 14:
        raise StudentFileError(
            "format dune: the official DUNE loader builds vit_small / vit_base / vit_large with patch 14 only; "
            f"{weights.source} is a custom student (width {weights.spec.embed_dim}, {weights.spec.depth} blocks, "
            f"{weights.spec.num_heads} heads, patch {weights.spec.patch_size}); use --format hf"
        )
    return arch


def write_dune(weights: StudentWeights, out: Path, resolution: tuple[int, int] | None = None) -> Path:
    """The official DUNE ``.pth``: ``model`` (its key layout), ``args`` (what its loader builds
    from: image_size, enc_args, proj_args, teachers) and ``iter``."""
    weights = at_resolution(weights, resolution)
    arch = _official_arch(weights)
    spec = weights.spec
    for name, dim in spec.teacher_dims.items():
        official = TEACHER_SPECS.get(name)
        if official is None or dim != official.arch["embed_dim"] or tuple(spec.teacher_tokens[name]) != official.tokens:
            expected = f"width {official.arch['embed_dim']}, tokens {list(official.tokens)}" if official else f"one of {', '.join(TEACHER_SPECS)}"
            raise StudentFileError(
                f"format dune: teacher {name} (width {dim}, tokens {spec.teacher_tokens[name]}) is not what the official "
                f"loader builds ({expected}); use --format hf"
            )
    args = argparse.Namespace(
        image_size=spec.image_size,
        enc_args={"arch": arch, "patch_size": spec.patch_size, "num_register_tokens": spec.num_register_tokens,
                  "layerscale_init": spec.layerscale_init},
        proj_args={"num_blocks": spec.projector_depth, "num_heads": spec.num_heads, "mlp_ratio": spec.projector_mlp_ratio,
                   "layerscale_init": spec.layerscale_init},
        teachers=sorted(spec.teacher_dims),
        dune_args={"last_enc_norm": False},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    model = {k: v.contiguous() for k, v in to_official_dune(weights.state).items()}
    torch.save({"model": model, "args": args, "iter": weights.step or 0}, out)
    return out


def _timm_config(weights: StudentWeights, arch: str) -> dict[str, Any]:
    spec = weights.spec
    model_args: dict[str, Any] = {"img_size": spec.image_size}
    named = NAMED_ARCHS.get(arch)
    if named != (spec.embed_dim, spec.depth, spec.num_heads):
        model_args.update(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads)
    if spec.num_register_tokens != 4:
        model_args["reg_tokens"] = spec.num_register_tokens
    if spec.patch_size != 14:
        model_args["patch_size"] = spec.patch_size
    return {
        "architecture": TIMM_NAMES[arch],
        "num_classes": 0,
        "num_features": spec.embed_dim,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, spec.image_size, spec.image_size], "interpolation": "bicubic",
            "crop_pct": 1.0,  # the shorter side is resized to the input size itself, as DUNE evaluates "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "num_classes": 0,
        },
    }


def write_timm(weights: StudentWeights, out: Path, resolution: tuple[int, int] | None = None) -> Path:
    """A timm local folder: ``timm.create_model("local-dir:OUT", pretrained=True)`` loads it (a
    custom shape keeps the ``vit_small`` name with its sizes in ``model_args``)."""
    weights = at_resolution(weights, resolution)
    from safetensors.torch import save_file

    arch = weights.spec.arch if weights.spec.arch != "custom" else "vit_small"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in to_timm(weights.state).items()}, str(out / HF_WEIGHTS))
    (out / HF_CONFIG).write_text(json.dumps(_timm_config(weights, arch), indent=2))
    return out


def write_hf(weights: StudentWeights, out: Path, resolution: tuple[int, int] | None = None, with_onnx: bool = False,
             dynamic: bool = False) -> Path:
    """A Hugging Face-style folder: full student weights, ``config.json``, a model card and a
    ``hubconf.py`` (``torch.hub.load(OUT, "dune_vitb14", source="local")``); ``with_onnx`` adds
    ``model.onnx``, the encoder at the folder's size (any size when ``dynamic``)."""
    from safetensors.torch import save_file

    weights = at_resolution(weights, resolution)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.state.items()}, str(out / HF_WEIGHTS))
    config = {
        "dune_scale": {"spec": asdict(weights.spec), "step": weights.step},
        "arch": weights.spec.arch,
        "image_size": weights.spec.image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    (out / HF_CONFIG).write_text(json.dumps(config, indent=2))
    (out / HF_CARD).write_text(model_card(weights))
    (out / HF_HUBCONF).write_text(_hubconf(weights.spec.arch))
    if with_onnx:
        write_onnx(weights, out / HF_ONNX, dynamic=dynamic)
    return out


def write_onnx(weights: StudentWeights, out: Path, resolution: tuple[int, int] | None = None, dynamic: bool = False) -> Path:
    """:func:`dune_scale.engine.onnx_export.write_onnx`, imported here because its packages are an extra."""
    try:
        from dune_scale.engine import onnx_export
    except ImportError as err:
        raise StudentFileError(f"format onnx needs the onnx extra (pip install 'dune_scale[onnx]'): {err}") from None
    return onnx_export.write_onnx(weights, out, resolution, dynamic)


def _hubconf(arch: str) -> str:
    entries = ["dune_encoder", *([HUB_ENTRY[arch]] if arch in HUB_ENTRY else [])]
    lines = [
        '"""torch.hub entry points of this exported DUNE student (generated by dune_scale)."""',
        "",
        "from pathlib import Path",
        "",
        'dependencies = ["torch", "dune_scale"]',
        "",
        "",
        "def dune_encoder(**kwargs):",
        '    """The encoder in eval mode; forward_features(images) -> {cls, patch, reg}, final norm not applied."""',
        "    from dune_scale import load_encoder",
        "",
        "    return load_encoder(Path(__file__).resolve().parent)",
    ]
    lines += [f"\n\n{name} = dune_encoder" for name in entries[1:]]
    return "\n".join(lines) + "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(weights: StudentWeights) -> str:
    """Markdown: architecture, recipe, data mixture with sizes, teachers with checkpoint hashes,
    steps, the last validation numbers of ``metrics.jsonl`` and the probe results table of the run
    (what the run folder tells)."""
    spec, config = weights.spec, weights.config or {}
    lines = [
        f"# DUNE student: {spec.arch} (patch {spec.patch_size}, {spec.image_size} px)",
        "",
        "Multi-teacher distilled vision encoder, trained with dune_scale.",
        "",
        "## Architecture",
        f"- width {spec.embed_dim}, {spec.depth} blocks, {spec.num_heads} heads, {spec.num_register_tokens} registers",
        "- projectors: " + ", ".join(f"{t} → {d} ({'+'.join(spec.teacher_tokens[t])})" for t, d in spec.teacher_dims.items()),
        f"- steps trained: {weights.step if weights.step is not None else 'unknown'}",
        *([f"- input size {spec.image_size} px: positional embedding resampled at export from the {weights.resampled_from} px "
           "it was trained at (as the encoder resamples it at that size)"] if weights.resampled_from else []),
        "",
        "## Recipe",
    ]
    train, optim = config.get("train", {}), config.get("optim", {})
    if train:
        lines.append(f"- stage {train.get('stage')}, {train.get('image_size')} px, {train.get('epochs')} epochs of "
                     f"{train.get('epoch_size')} images, batch {train.get('batch_size_per_rank')} per rank, precision {train.get('precision')}")
        lines.append(f"- AdamW base lr {optim.get('base_lr')} (per {optim.get('lr_reference_batch')} images), weight decay "
                     f"{optim.get('weight_decay')}, teacher dropping {config.get('distill', {}).get('teacher_drop')}")
    else:
        lines.append(f"- unknown (exported from {weights.source}, no run config beside it)")
    lines += ["", "## Data mixture", *_mixture_lines(config), "", "## Teachers", *_teacher_lines(config, weights.run_dir)]
    lines += ["", "## Last validation", *_validation_lines(weights.run_dir)]
    lines += ["", "## Probes on frozen features", *run_results_lines(weights.run_dir)]
    lines += ["", "## Use", "```python", "from dune_scale import load_encoder", "encoder = load_encoder(\"THIS_FOLDER\")",
              "features = encoder.forward_features(encoder.preprocess(image_uint8_chw)[None])  # cls, patch (before the final norm)",
              "```", ""]
    return "\n".join(lines)


def _mixture_lines(config: dict[str, Any]) -> list[str]:
    data = config.get("data")
    if not data:
        return ["- unknown"]
    from dune_scale.data.mixture import MixtureError, resolve_mixture

    try:
        mixture = resolve_mixture(data["mixture"], data["balance"], data["remote_root"])
    except (MixtureError, KeyError, OSError) as err:
        return [f"- {data.get('mixture')} (sizes unavailable: {err})"]
    lines = [f"- `{data['mixture'] if isinstance(data['mixture'], str) else 'custom'}`, balance {mixture.balance}", "",
             "| dataset | domain | images | share of each batch |", "|---|---|---|---|"]
    for stream in mixture.streams:
        size = stream.size if stream.size is not None else _local_dataset_size(data["remote_root"], stream.name)
        size = f"{size:,}" if size is not None else "?"
        lines.append(f"| {stream.name} | {stream.domain} | {size} | {stream.proportion:.3f} |")
    return lines


def _local_dataset_size(remote_root: str, name: str) -> int | None:
    from dune_scale.data.mixture import MixtureError, _size_from_index

    try:
        return _size_from_index(remote_root, name)
    except (MixtureError, OSError, ValueError):
        return None


def _teacher_lines(config: dict[str, Any], run_dir: Path | None) -> list[str]:
    models = config.get("teachers", {}).get("models", [])
    if not models:
        return ["- unknown"]
    lines = []
    for teacher in models:
        checkpoint = teacher.get("checkpoint")
        if teacher.get("random_init") or not checkpoint:
            origin = "random init"
        else:
            path = Path(checkpoint)
            path = path if path.is_absolute() or path.is_file() or run_dir is None else run_dir / path
            origin = f"`{checkpoint}` sha256 {sha256_file(path)}" if path.is_file() else f"`{checkpoint}` (not found at export time)"
        lines.append(f"- {teacher['name']}: {origin}")
    return lines


def _validation_lines(run_dir: Path | None) -> list[str]:
    metrics = run_dir / "metrics.jsonl" if run_dir else None
    if metrics is None or not metrics.is_file():
        return ["- none recorded"]
    from dune_scale.telemetry.metrics import read_metrics

    last = [r for r in read_metrics(metrics) if any(k.startswith("val") for k in r)]
    if not last:
        return ["- none recorded"]
    record = last[-1]
    return [f"- step {record.get('step')}"] + [f"- {k}: {v}" for k, v in sorted(record.items()) if k.startswith("val")]


WRITERS = {"dune": write_dune, "timm": write_timm, "hf": write_hf, "onnx": write_onnx}


def export(source: str | Path, fmt: str, out: str | Path, student: str | None = None,
           resolution: tuple[int, int] | None = None, **options: bool) -> Path:
    """Read ``source`` (``student``: one of several students of a run) and write it as ``fmt`` (one
    of :data:`FORMATS`) to ``out``, at ``resolution`` (H, W; default the training size);
    ``options``: the writer's own (``dynamic`` for onnx; ``with_onnx``, ``dynamic`` for hf)."""
    if fmt not in WRITERS:
        raise StudentFileError(f"format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    return WRITERS[fmt](read_student(source, student), Path(out), resolution=resolution, **options)
