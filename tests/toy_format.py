"""A toy export format for the test of the format table: the encoder's tensors in one NumPy
``.npz``, ``--half`` storing them in float16. What a new format is: one module like this one and
one line in ``FORMATS``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dune_scale.engine.export.formats.base import ExportFormat
from dune_scale.engine.export.weights import StudentWeights, at_resolution


def write_npz(weights: StudentWeights, out: Path, resolution: tuple[int, int] | None = None, half: bool = False) -> Path:
    weights = at_resolution(weights, resolution)
    encoder = {k[len("encoder.") :]: v.half() if half else v for k, v in weights.state.items() if k.startswith("encoder.")}
    with open(out, "wb") as handle:  # a handle: np.savez would add .npz to a name without it
        np.savez(handle, **{k: v.numpy() for k, v in encoder.items()})
    return out


FORMAT = ExportFormat("npz", "the encoder's tensors in one NumPy .npz", write_npz, options={"half": "stores float16 (half the size)"})
