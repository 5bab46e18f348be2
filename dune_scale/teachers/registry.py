"""The DUNE teachers: architecture defaults, checkpoint layout, distilled tokens, data domain."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dune_scale.models.croco import CrocoEncoder
from dune_scale.models.vit import VisionTransformer

# The DINOv2 model class defaults DUNE builds its DINOv2-type teachers with (not the torch.hub
# `*_reg` entry points, which use antialias=True, offset 0.0). Layer-scale modules exist
# (init_values=1); their values come from the checkpoint.
_DINOV2_ARCH: dict[str, Any] = {
    "img_size": 518, "patch_size": 14, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0,
    "layerscale_init": 1.0, "norm_eps": 1e-6, "interpolate_offset": 0.1, "interpolate_antialias": False,
}
_FAMILIES: dict[str, type[nn.Module]] = {"dinov2": VisionTransformer, "croco": CrocoEncoder}
# Fixed by the checkpoint layout, never an architecture choice.
_NOT_ARCH = {"with_mask_token", "attention"}


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    family: str  # "dinov2" (VisionTransformer) or "croco" (CrocoEncoder)
    layout: str  # checkpoint layout: "dinov2_release", "multihmr", "mast3r"
    arch: dict[str, Any] = field(default_factory=dict)  # full-size defaults
    tokens: tuple[str, ...] = ("patch",)  # token types DUNE distils
    domain: str = ""  # the data domain this teacher "owns"

    @property
    def patch_size(self) -> int:
        return int(self.arch["patch_size"])

    def arch_keys(self) -> list[str]:
        """The settings ``arch`` may override (the constructor's keyword arguments)."""
        params = inspect.signature(_FAMILIES[self.family]).parameters
        return [name for name in params if name not in _NOT_ARCH]

    def build(self, attention: str = "auto", **overrides: Any) -> nn.Module:
        """The architecture with ``overrides`` (tiny test teachers) and the ``attention`` backend,
        randomly initialised (or parameter-less under ``torch.device("meta")``, before a checkpoint
        is assigned)."""
        unknown = sorted(set(overrides) - set(self.arch_keys()))
        if unknown:
            raise ValueError(
                f"teacher {self.name}: unknown arch setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(self.arch_keys())}"
            )
        arch = {**self.arch, **overrides}
        if self.family == "croco":
            return CrocoEncoder(attention=attention, **arch)
        return VisionTransformer(with_mask_token=True, attention=attention, **arch)


TEACHER_SPECS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in (
        TeacherSpec(
            "dino2reg_vitlarge_14", "dinov2", "dinov2_release",
            {**_DINOV2_ARCH, "num_register_tokens": 4}, ("cls", "patch"), "dino2",
        ),
        TeacherSpec(
            "mast3r_vitlarge_16", "croco", "mast3r",
            {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 16, "img_size": 512, "rope_base": 100.0},
            ("patch",), "mast3r",
        ),
        TeacherSpec(
            "multihmr_vitlarge_14_672", "dinov2", "multihmr",
            {**_DINOV2_ARCH, "num_register_tokens": 0}, ("patch",), "multihmr",
        ),
    )
}


def get_teacher_spec(name: str) -> TeacherSpec:
    try:
        return TEACHER_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown teacher {name!r}; known teachers: {', '.join(TEACHER_SPECS)}") from None
