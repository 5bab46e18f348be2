"""``build_teacher``: a teacher module from its official checkpoint, a safetensors conversion, or
random weights (tests and the demo only; the config layer asks for that explicitly)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dune_scale.teachers.checkpoints import load_strict, read_teacher_file, safetensors_metadata_path
from dune_scale.teachers.registry import get_teacher_spec


def build_teacher(name: str, checkpoint: str | Path | None = None, attention: str = "auto", **arch: Any) -> nn.Module:
    """The teacher ``name`` in float32 on the CPU, from ``checkpoint`` (an official release file or
    a ``.safetensors`` conversion), or randomly initialised when it is None.

    ``arch`` overrides the full-size architecture (embed_dim, depth, num_heads, patch_size,
    img_size, num_register_tokens, …) and any settings the file records (MASt3R's args string, a
    conversion's JSON). ``attention`` is the attention backend (``models.attention.BACKENDS``).
    The module records its name and architecture as ``teacher_name`` and
    ``teacher_arch``.
    """
    spec = get_teacher_spec(name)
    if checkpoint is None:
        effective = {**spec.arch, **arch}
        module = spec.build(attention, **arch)
    else:
        path = Path(checkpoint)
        file_arch, state = read_teacher_file(spec, path)
        effective = {**spec.arch, **file_arch, **arch}
        with torch.device("meta"):  # no random init of weights that are overwritten at once
            module = spec.build(attention, **{**file_arch, **arch})
        load_strict(spec, path, module, state)
    module.teacher_name = name
    module.teacher_arch = effective
    return module


def convert_teacher(name: str, checkpoint: str | Path, out: str | Path, **arch: Any) -> tuple[Path, Path]:
    """Official checkpoint → ``out.safetensors`` + ``out.json`` (teacher name + architecture), so
    cluster jobs load teachers fast and never unpickle. The weights are checked by a strict load
    first, so a conversion that succeeds always loads."""
    module = build_teacher(name, checkpoint, **arch)
    weights = Path(f"{out}.safetensors") if Path(out).suffix != ".safetensors" else Path(out)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    meta = safetensors_metadata_path(weights)
    meta.write_text(json.dumps({"teacher": name, "arch": module.teacher_arch, "source": str(checkpoint)}, indent=1))
    return weights, meta
