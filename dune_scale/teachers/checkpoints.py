"""Official teacher checkpoints → our module's state dict, and the safetensors form we convert to.

Never unpickles arbitrary objects: ``torch.load(weights_only=True)``, with exactly one class
allow-listed (``argparse.Namespace``, which the real Multi-HMR and MASt3R files hold as ``args``).
Every problem raises :class:`TeacherCheckpointError` naming the teacher, the file and the key.
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dune_scale.teachers.registry import TeacherSpec

MULTIHMR_PREFIX = "backbone.encoder."
MAST3R_ENCODER_PREFIXES = ("patch_embed.", "enc_blocks.", "enc_norm.")


class TeacherCheckpointError(ValueError):
    """A teacher checkpoint that cannot be used (the message names teacher, file and key)."""


def _fail(spec: TeacherSpec, path: Path, problem: str) -> TeacherCheckpointError:
    return TeacherCheckpointError(f"teacher {spec.name}: checkpoint {path}: {problem}")


def read_checkpoint(spec: TeacherSpec, path: Path) -> Any:
    if not path.is_file():
        raise _fail(spec, path, "file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            # mmap: a ViT-L file is not copied into memory before the encoder's tensors are picked.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - truncated zip, bad pickle, forbidden global …
        raise _fail(spec, path, f"cannot be read (truncated, corrupt or not a PyTorch checkpoint): {err}") from None


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:6]
        return f"a dict with keys {', '.join(map(str, keys))}{' …' if len(obj) > 6 else ''}"
    return f"a {type(obj).__name__}"


def _args_model_string(args: Any) -> str:
    model = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
    return model if isinstance(model, str) else ""


def mast3r_arch_from_args(args: Any) -> dict[str, Any]:
    """Encoder width/depth/heads and RoPE base from the ``AsymmetricMASt3R(...)`` constructor string."""
    text = _args_model_string(args)
    found: dict[str, Any] = {}
    for key, arch_key in (("enc_embed_dim", "embed_dim"), ("enc_depth", "depth"), ("enc_num_heads", "num_heads"), ("patch_size", "patch_size")):
        match = re.search(rf"\b{key}\s*=\s*(\d+)", text)
        if match:
            found[arch_key] = int(match.group(1))
    rope = re.search(r"pos_embed\s*=\s*['\"]RoPE(\d+)['\"]", text)
    if rope:
        found["rope_base"] = float(rope.group(1))
    return found


def official_state_dict(spec: TeacherSpec, path: Path, raw: Any) -> dict[str, torch.Tensor]:
    """Select and rename the encoder's tensors for ``spec.layout``; other parts are ignored."""
    if spec.layout == "dinov2_release":
        if not (isinstance(raw, dict) and "cls_token" in raw and all(isinstance(v, torch.Tensor) for v in raw.values())):
            raise _fail(spec, path, f"expected a DINOv2 release state dict (cls_token, blocks.*), found {_describe(raw)}; is it another teacher's file?")
        return dict(raw)
    if spec.layout == "multihmr":
        state = raw.get("model_state_dict") if isinstance(raw, dict) else None
        if not isinstance(state, dict):
            raise _fail(spec, path, f"expected a Multi-HMR training checkpoint with 'model_state_dict', found {_describe(raw)}; is it another teacher's file?")
        encoder = {k[len(MULTIHMR_PREFIX):]: v for k, v in state.items() if k.startswith(MULTIHMR_PREFIX)}
        if not encoder:
            raise _fail(spec, path, f"'model_state_dict' has no '{MULTIHMR_PREFIX}*' keys")
        return encoder
    if spec.layout == "mast3r":
        model = raw.get("model") if isinstance(raw, dict) else None
        if not isinstance(model, dict) or "args" not in raw:
            raise _fail(spec, path, f"expected a MASt3R checkpoint with 'model' and 'args', found {_describe(raw)}; is it another teacher's file?")
        return {k: v for k, v in model.items() if k.startswith(MAST3R_ENCODER_PREFIXES)}
    raise ValueError(f"unknown checkpoint layout {spec.layout!r}")


def load_strict(spec: TeacherSpec, path: Path, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every key present, none extra, every shape equal: else one error naming the key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise _fail(spec, path, f"missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise _fail(spec, path, f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected); is it another teacher's file?")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise _fail(
                spec, path,
                f"key {key!r} has shape {tuple(value.shape)} but the model expects {tuple(expected[key].shape)}; "
                "check the teacher's arch settings",
            )
    module.load_state_dict(state, strict=True)


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
        raise _fail(spec, path, f"it was converted from teacher {meta.get('teacher')!r}, not {spec.name!r}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _fail(spec, path, f"cannot be read (truncated or corrupt safetensors): {err}") from None
    return dict(meta.get("arch", {})), tensors
