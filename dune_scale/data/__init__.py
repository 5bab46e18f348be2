"""Data: mixture → MDS streams → teacher-balanced, resumable, augmented batches (DESIGN §2).

Names are imported lazily: the mixture spec is plain Python + YAML, while the loader pulls in
mosaicml-streaming (and through it torchvision/transformers), which a benchmark on synthetic
batches or a machine without Streaming must not need.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ConvertReport": "convert", "convert_dataset": "convert", "list_sources": "convert",
    "MixtureDataset": "dataset",
    "build_train_loader": "loader", "build_val_loader": "loader", "collate_batch": "loader",
    "init_loader_worker": "loader", "close_loader": "loader",
    "DataError": "errors", "MissingDataError": "errors",
    "Mixture": "mixture", "MixtureError": "mixture", "MixtureStream": "mixture",
    "available_mixtures": "mixture", "resolve_mixture": "mixture",
    "ShardIntegrityError": "remote", "StorageAccessError": "remote", "reset_worker_connections": "remote",
    "write_demo_shards": "synthetic", "write_synthetic_dataset": "synthetic",
    "CorruptImageError": "transforms", "build_train_transform": "transforms", "build_val_transform": "transforms",
    "decode_image": "transforms", "sample_generator": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
