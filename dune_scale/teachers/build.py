"""``build_teacher``: a teacher module from its official checkpoint, a safetensors conversion, or
random weights (tests and the demo only; the config layer asks for that explicitly)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from dune_scale.teachers.checkpoints import (
    load_strict,
    mast3r_arch_from_args,
    official_state_dict,
    read_checkpoint,
    read_safetensors,
    safetensors_metadata_path,
)
from dune_scale.teachers.registry import get_teacher_spec


def build_teacher(name: str, checkpoint: str | Path | None = None, **arch: Any) -> nn.Module:
    """``arch`` overrides the full-size architecture (embed_dim, depth, num_heads, patch_size,
    img_size, num_register_tokens, …). The module records its architecture as ``teacher_arch``."""
    spec = get_teacher_spec(name)
    state = None
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.suffix == ".safetensors":
            saved_arch, state = read_safetensors(spec, path)
            arch = {**saved_arch, **arch}
        else:
            raw = read_checkpoint(spec, path)
            state = official_state_dict(spec, path, raw)
            if spec.layout == "mast3r":
                arch = {**mast3r_arch_from_args(raw["args"]), **arch}
    effective = {**spec.arch, **arch}
    module = spec.build(**effective)
    if state is not None:
        load_strict(spec, path, module, state)
    module.teacher_name = name
    module.teacher_arch = effective
    return module


def convert_teacher(name: str, checkpoint: str | Path, out: str | Path, **arch: Any) -> tuple[Path, Path]:
    """Official checkpoint → ``out.safetensors`` + ``out.json`` (teacher name + architecture), so
    cluster jobs load teachers fast and never unpickle."""
    module = build_teacher(name, checkpoint, **arch)
    weights = Path(out).with_suffix(".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    meta = safetensors_metadata_path(weights)
    meta.write_text(json.dumps({"teacher": name, "arch": module.teacher_arch, "source": str(checkpoint)}, indent=1))
    return weights, meta
