"""The DUNE student: encoder + one projector per teacher + per-teacher feature standardisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dune_scale.config import TOKEN_TYPES
from dune_scale.distill.teacher_norm import TeacherNorm
from dune_scale.models.projector import TransformerProjector
from dune_scale.models.vit import VisionTransformer


class DuneStudent(nn.Module):
    """Maps images to one prediction per (teacher, distilled token type).

    The encoder's final LayerNorm is skipped before the projectors (as in DUNE); register tokens
    are dropped, so each projector sees ``[cls, patch tokens]`` and its output token 0 is the
    class prediction, the rest the patch predictions. The teacher norms live here so that their
    running statistics travel with the student's checkpoints.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        teacher_dims: Mapping[str, int],
        teacher_tokens: Mapping[str, Sequence[str]],
        projector_depth: int = 1,
        projector_mlp_ratio: float = 4.0,
        projector_layerscale_init: float | None = 1e-4,
        projector_attention: str = "auto",
    ) -> None:
        super().__init__()
        for name, tokens in teacher_tokens.items():
            unknown = set(tokens) - set(TOKEN_TYPES)
            if unknown or not tokens:
                raise ValueError(f"teacher {name}: token types must be a non-empty subset of {TOKEN_TYPES}, got {tokens}")
        self.encoder = encoder
        # Kept for downstream use and released weights, but it never sees a gradient here: frozen,
        # so no strategy has to special-case a parameter without gradient.
        encoder.norm.requires_grad_(False)
        self.teacher_tokens = {name: tuple(t for t in TOKEN_TYPES if t in teacher_tokens[name]) for name in teacher_dims}
        self.projectors = nn.ModuleDict(
            {
                name: TransformerProjector(
                    encoder.embed_dim,
                    dim,
                    num_heads=encoder.num_heads,
                    depth=projector_depth,
                    mlp_ratio=projector_mlp_ratio,
                    layerscale_init=projector_layerscale_init,
                    attention=projector_attention,
                )
                for name, dim in teacher_dims.items()
            }
        )
        self.teacher_norms = nn.ModuleDict(
            {
                name: nn.ModuleDict({token: TeacherNorm(dim) for token in self.teacher_tokens[name]})
                for name, dim in teacher_dims.items()
            }
        )

    def forward(self, images: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        tokens = self.encoder.forward_tokens(images)
        tokens = torch.cat([tokens[:, :1], tokens[:, self.encoder.num_prefix_tokens :]], dim=1)
        outputs: dict[str, dict[str, torch.Tensor]] = {}
        for name, projector in self.projectors.items():
            projected = projector(tokens)
            split = {"cls": projected[:, 0], "patch": projected[:, 1:]}
            outputs[name] = {token: split[token] for token in self.teacher_tokens[name]}
        return outputs
