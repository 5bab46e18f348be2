"""Official teacher checkpoints → our module's state dict, and the safetensors form we convert to.

Never unpickles arbitrary objects: ``torch.load(weights_only=True)``, with exactly one class
allow-listed (``argparse.Namespace``, which the real Multi-HMR and MASt3R files hold as ``args``).
Every problem raises :class:`TeacherCheckpointError` naming the teacher, the file and the key.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dune_scale.safe_load import UnreadableCheckpoint, torch_load
from dune_scale.teachers.registry import TeacherSpec

MULTIHMR_PREFIX = "backbone.encoder."
MAST3R_ENCODER_PREFIXES = ("patch_embed.", "enc_blocks.", "enc_norm.")
ALLOWED_GLOBALS = {"argparse.Namespace": argparse.Namespace}
_LAYOUTS = {
    "dinov2_release": "a DINOv2 release state dict (top-level 'cls_token', 'blocks.*', ...)",
    "multihmr": f"a Multi-HMR training checkpoint ('model_state_dict' holding '{MULTIHMR_PREFIX}*')",
    "mast3r": "a MASt3R checkpoint ('model' + 'args')",
}
# The top-level key each layout is recognised by (named in errors as the offending key).
_LAYOUT_KEY = {"dinov2_release": "cls_token", "multihmr": "model_state_dict", "mast3r": "model"}


class TeacherCheckpointError(ValueError):
    """A teacher checkpoint that cannot be used (the message names teacher, file and key)."""


def _fail(spec: TeacherSpec, path: Path, problem: str) -> TeacherCheckpointError:
    return TeacherCheckpointError(f"teacher {spec.name}: checkpoint {path}: {problem}")


def read_teacher_file(spec: TeacherSpec, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture found in the file, encoder state dict) of an official checkpoint or a
    ``.safetensors`` conversion."""
    if path.suffix == ".safetensors":
        return read_safetensors(spec, path)
    raw = read_checkpoint(spec, path)
    state = official_state_dict(spec, path, raw)
    arch = mast3r_arch_from_args(spec, path, raw.get("args")) if spec.layout == "mast3r" else {}
    return arch, state


def read_checkpoint(spec: TeacherSpec, path: Path) -> Any:
    if not path.is_file():
        raise _fail(spec, path, "file not found")
    try:
        return load_allow_listed(path)
    except UnreadableCheckpoint as err:
        raise _fail(spec, path, str(err)) from None


def load_allow_listed(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with only :data:`ALLOWED_GLOBALS` unpickled (teachers and
    released DUNE students); any failure is one :class:`UnreadableCheckpoint` saying why."""
    return torch_load(path, ALLOWED_GLOBALS)


def detect_layout(raw: Any) -> str | None:
    """Which official teacher layout ``raw`` has, if any: to tell a user they passed another
    teacher's file, or a teacher's file where a student was expected (the one detector of both)."""
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("model_state_dict"), dict):
        return "multihmr"
    model = raw.get("model")
    if isinstance(model, dict) and any(str(k).startswith(("enc_blocks.", "module.enc_blocks.")) for k in model):
        return "mast3r"
    if "cls_token" in raw and "mask_token" in raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return "dinov2_release"
    return None


def describe_layout(layout: str) -> str:
    """A layout :func:`detect_layout` found, in words (for messages)."""
    return _LAYOUTS[layout]


def _top_level(raw: Any) -> str:
    if isinstance(raw, dict):
        keys = [str(k) for k in list(raw)[:6]]
        return f"top-level keys {', '.join(keys)}{' …' if len(raw) > 6 else ''}"
    return f"a {type(raw).__name__}"


def official_state_dict(spec: TeacherSpec, path: Path, raw: Any) -> dict[str, torch.Tensor]:
    """Select and rename the encoder's tensors for ``spec.layout``; other parts are ignored."""
    layout = detect_layout(raw)
    if layout != spec.layout:
        found = f"this is {_LAYOUTS[layout]}, another teacher's file?" if layout else f"found {_top_level(raw)}"
        raise _fail(
            spec, path,
            f"expected {_LAYOUTS[spec.layout]} but key {_LAYOUT_KEY[spec.layout]!r} is not there; {found}",
        )
    if spec.layout == "dinov2_release":
        return dict(raw)
    if spec.layout == "multihmr":
        state = raw["model_state_dict"]
        encoder = {k[len(MULTIHMR_PREFIX) :]: v for k, v in state.items() if k.startswith(MULTIHMR_PREFIX)}
        if not encoder:
            raise _fail(spec, path, f"'model_state_dict' has no '{MULTIHMR_PREFIX}*' keys")
        return encoder
    return {k: v for k, v in raw["model"].items() if k.startswith(MAST3R_ENCODER_PREFIXES)}


def mast3r_arch_from_args(spec: TeacherSpec, path: Path, args: Any) -> dict[str, Any]:
    """Encoder settings from the ``AsymmetricMASt3R(...)`` constructor string (``args.model``;
    a Namespace in the release files, a dict in some re-saved ones)."""
    text = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
    if not isinstance(text, str):
        raise _fail(spec, path, "key 'args' has no 'model' constructor string")
    found: dict[str, Any] = {}
    names = {"enc_embed_dim": "embed_dim", "enc_depth": "depth", "enc_num_heads": "num_heads", "patch_size": "patch_size"}
    for key, arch_key in names.items():
        match = re.search(rf"\b{key}\s*=\s*(\d+)", text)
        if match:
            found[arch_key] = int(match.group(1))
    size = re.search(r"\bimg_size\s*=\s*\(?\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)?", text)
    if size:
        height, width = int(size.group(1)), int(size.group(2) or size.group(1))
        found["img_size"] = height if height == width else (height, width)
    pos_embed = re.search(r"\bpos_embed\s*=\s*['\"]([^'\"]*)['\"]", text)
    if pos_embed:
        rope = re.fullmatch(r"RoPE(\d+)", pos_embed.group(1))
        if not rope:
            raise _fail(
                spec, path, f"args.model has pos_embed={pos_embed.group(1)!r}; only 2D RoPE (e.g. 'RoPE100') is supported"
            )
        found["rope_base"] = float(rope.group(1))
    return found


def load_strict(spec: TeacherSpec, path: Path, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every key present, none extra, every shape equal: else one error naming the key.

    The tensors are assigned (not copied), so ``module`` may be built on the meta device: a
    ViT-L teacher then costs neither a random init nor a second copy of its weights.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise _fail(spec, path, f"missing key {missing[0]!r} ({len(missing)} missing); check the teacher's arch settings")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise _fail(
            spec, path, f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected); check the teacher's arch settings"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise _fail(
                spec, path,
                f"key {key!r} has shape {tuple(value.shape)} but the model expects {tuple(expected[key].shape)}; "
                "check the teacher's arch settings",
            )
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"teacher {spec.name}: {left[0]!r} was not filled by the checkpoint (no state-dict entry)")


def safetensors_metadata_path(path: Path) -> Path:
    return path.with_suffix(".json")


def read_safetensors(spec: TeacherSpec, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture, tensors) of a converted teacher; the JSON beside it must name this teacher."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path = safetensors_metadata_path(path)
    if not path.is_file():
        raise _fail(spec, path, "file not found")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise _fail(spec, path, f"its architecture file {meta_path} is missing or unreadable: {err}") from None
    if meta.get("teacher") != spec.name:
        converted_from = meta.get("teacher")
        raise _fail(spec, path, f"key 'teacher' of {meta_path.name}: converted from teacher {converted_from!r}, not {spec.name!r}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _fail(spec, path, f"cannot be read (truncated or corrupt safetensors?): {err}") from None
    return dict(meta.get("arch", {})), tensors
