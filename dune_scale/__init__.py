"""dune_scale: DUNE-style multi-teacher distillation of vision encoders at cluster scale."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dune_scale.engine.export import DuneEncoder

__version__ = "0.1.0"


def load_encoder(path_or_folder: str | Path) -> DuneEncoder:
    """The trained encoder from a run folder, a checkpoint (any strategy), ``student.safetensors``,
    an official DUNE ``.pth`` or an exported folder, in eval mode.

    ``encoder.forward_features(images)`` (ImageNet-normalised) returns ``cls`` (B, D), ``patch``
    (B, N, D) and ``reg`` before the final norm, as DUNE's ``get_encoder_output``;
    ``encoder.preprocess(uint8 (3, H, W) image)`` gives the model input at its training size.
    Imported lazily so that ``import dune_scale`` stays light.
    """
    from dune_scale.engine.export import load_encoder as _load_encoder

    return _load_encoder(path_or_folder)
