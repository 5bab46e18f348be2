"""Data: mixture → MDS streams → teacher-balanced, resumable, augmented batches (DESIGN §2)."""

from dune_scale.data.convert import ConvertReport, convert_dataset, list_sources
from dune_scale.data.dataset import MixtureDataset
from dune_scale.data.loader import build_train_loader, collate_batch
from dune_scale.data.mixture import Mixture, MixtureError, MixtureStream, available_mixtures, resolve_mixture
from dune_scale.data.remote import ShardIntegrityError, StorageAccessError, reset_worker_connections
from dune_scale.data.synthetic import write_demo_shards, write_synthetic_dataset
from dune_scale.data.transforms import (
    CorruptImageError,
    build_train_transform,
    build_val_transform,
    decode_image,
    sample_generator,
)

__all__ = [
    "ConvertReport",
    "CorruptImageError",
    "Mixture",
    "MixtureDataset",
    "MixtureError",
    "MixtureStream",
    "ShardIntegrityError",
    "StorageAccessError",
    "available_mixtures",
    "build_train_loader",
    "build_train_transform",
    "build_val_transform",
    "collate_batch",
    "convert_dataset",
    "decode_image",
    "list_sources",
    "reset_worker_connections",
    "resolve_mixture",
    "sample_generator",
    "write_demo_shards",
    "write_synthetic_dataset",
]
