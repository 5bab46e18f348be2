"""The MDS schema of every shard the project writes (converter, synthetic data) and reads (loader).

``image``: the stored bytes; ``format`` their format (jpeg | png | webp); ``rotate`` degrees
counter-clockwise applied at load; ``dataset`` the mixture's dataset name; ``index`` the sample's
index within its dataset. Shards of earlier versions hold ``jpeg`` instead of the first three.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dune_scale.data.errors import DataError
from dune_scale.files import escapes

MDS_COLUMNS = {"image": "bytes", "format": "str", "rotate": "int", "dataset": "str", "index": "int"}
MDS_HASHES = ["sha1", "xxh64"]


def index_shards(index: Path, dataset: str) -> list[dict[str, Any]]:
    """The shard entries of an MDS ``index.json``, with the fields the loader reads checked:
    a file with other types (``{"shards": 5}``) or a shard file name that would lead outside its
    folder is one :class:`DataError` naming the file and the field."""
    try:
        shards = json.loads(index.read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"dataset {dataset}: {index} is not an MDS index ({type(err).__name__}: {err})") from None
    if not isinstance(shards, list):
        raise DataError(f"dataset {dataset}: {index} is not an MDS index ('shards' is {shards!r}, not a list)")
    for i, shard in enumerate(shards):
        problem = _shard_entry_problem(shard, index.parent)
        if problem:
            raise DataError(f"dataset {dataset}: {index} is not a usable MDS index (shards.{i}: {problem})")
    return shards


def _shard_entry_problem(shard: Any, folder: Path) -> str | None:
    if not isinstance(shard, dict):
        return f"{shard!r} is not a mapping"
    if not isinstance(shard.get("samples"), int) or isinstance(shard["samples"], bool) or shard["samples"] < 0:
        return f"samples is {shard.get('samples')!r}, not a count"
    for key in ("raw_data", "zip_data"):
        entry = shard.get(key)
        if entry is None and key == "zip_data":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("basename"), str) or not isinstance(entry.get("bytes"), int):
            return f"{key} is {entry!r}, not {{basename: a file name, bytes: a size}}"
        if escapes(folder, entry["basename"]):
            return f"{key}.basename {entry['basename']!r} leads outside {folder}"
        if not isinstance(entry.get("hashes", {}), dict):
            return f"{key}.hashes is {entry['hashes']!r}, not a mapping"
    return None
