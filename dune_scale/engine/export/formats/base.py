"""What an output format is: a writer, the switches it takes, and (for a folder format) a reader
that takes back what it wrote."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dune_scale.engine.export.weights import StudentWeights

# The files of the folder formats (timm and Hugging Face-style): weights and the config that says
# which of them wrote the folder.
FOLDER_WEIGHTS, FOLDER_CONFIG = "model.safetensors", "config.json"

# (weights, out, resolution (H, W) or None, **the format's switches) → the path written (``out``).
Writer = Callable[..., Path]
# (folder, its config.json) → the student, or None when the config is not this format's.
Reader = Callable[[Path, dict[str, Any]], "StudentWeights | None"]


@dataclass(frozen=True)
class ExportFormat:
    """One ``--format``: ``help`` is its line in ``launch/export.py --help``; ``options`` are the
    on/off switches its writer takes (``with_onnx`` → ``--with-onnx``), each with the sentence
    that says what it is for (its help, and the message when given to another format)."""

    name: str
    help: str
    write: Writer
    options: dict[str, str] = field(default_factory=dict)
    read: Reader | None = None
