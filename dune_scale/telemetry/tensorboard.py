"""TensorBoard as a second metrics sink (clusters without W&B): event files under the run folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dune_scale.telemetry.metrics import scalar_tags

TENSORBOARD_FOLDER = "tensorboard"


def tensorboard_available() -> bool:
    """torch.utils.tensorboard writes event files only with the ``tensorboard`` package installed."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardSink:
    """Each record's numbers as scalars at its step (see :func:`scalar_tags` for the tag names), and
    the feature pictures a ``pictures`` record names as images."""

    def __init__(self, output_dir: Path) -> None:
        # Needs the tensorboard package: run.tensorboard=true checks for it before any work.
        from torch.utils.tensorboard import SummaryWriter

        self.output_dir = Path(output_dir)
        self.writer = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_FOLDER))

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in scalar_tags(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        for i, path in enumerate(record.get("paths", [])):  # feature pictures (PNG files)
            with Image.open(self.output_dir / path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"{record['kind']}/{i}", pixels, global_step=record["step"], dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
