"""Data mixture: which datasets, which teacher domain each belongs to, and each one's batch share.

A mixture is a named spec in ``configs/data/<name>.yaml`` (shipped inside the package as
``dune_scale/configs``, so installed copies find it too) or an inline list of
``{name, domain, size?, val_size?, weight?}``. ``balance`` turns it into *groups* whose share of every
per-rank batch is fixed (the loader's grouped batching enforces it, see ``batching.py``):

* ``teacher_domains``: one group per teacher domain, each 1/number-of-domains of the batch; inside a
  domain, datasets are mixed at random in proportion to their size (the DUNE recipe, DESIGN §2);
* ``proportional``: a single group, datasets in proportion to their size;
* ``weights``: one group per dataset, with the list's ``weight`` as its batch share.
"""

from __future__ import annotations

import importlib.resources
import math
import os
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Sequence

import yaml

from dune_scale.data.errors import MissingDataError
from dune_scale.data.schema import index_shards
from dune_scale.files import is_plain_name

BALANCES = ("teacher_domains", "proportional", "weights")
_ENTRY_KEYS = {"name", "domain", "size", "val_size", "weight"}


class MixtureError(ValueError):
    """The mixture cannot be built as asked (unknown name, bad entry, missing size or weight)."""


@dataclass(frozen=True)
class MixtureStream:
    """One dataset of the mixture; ``proportion`` is its expected share of every batch."""

    name: str
    domain: str
    size: int | None
    proportion: float
    group: int
    val_size: int | None = None


@dataclass(frozen=True)
class Mixture:
    """Datasets with their domains, and the groups whose batch shares are fixed per batch."""

    streams: tuple[MixtureStream, ...]
    domains: tuple[str, ...]
    balance: str
    group_names: tuple[str, ...]
    group_shares: tuple[float, ...]

    def domain_of(self, dataset_name: str) -> str:
        for stream in self.streams:
            if stream.name == dataset_name:
                return stream.domain
        raise KeyError(f"dataset {dataset_name!r} is not in the mixture ({', '.join(self.names)})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.streams)

    @property
    def validation_names(self) -> tuple[str, ...]:
        """The datasets that have a validation split (a ``val_size`` in the mixture spec), in mixture
        order; as in the official code, in19k and cuffs have none."""
        return tuple(s.name for s in self.streams if s.val_size)

    def validation_split(self, dataset_name: str) -> Mixture:
        """One dataset's validation split as a mixture of its own: one group, its ``val_size`` as size."""
        spec = next((s for s in self.streams if s.name == dataset_name), None)
        if spec is None:
            raise MixtureError(f"dataset {dataset_name!r} is not in the mixture ({', '.join(self.names)})")
        stream = MixtureStream(spec.name, spec.domain, spec.val_size, proportion=1.0, group=0)
        return Mixture((stream,), (spec.domain,), "proportional", ("all",), (1.0,))

    def group_streams(self) -> list[list[int]]:
        """Stream indices of every group, in group order."""
        return [[i for i, s in enumerate(self.streams) if s.group == g] for g in range(len(self.group_names))]

    def batch_size_problem(self, batch_size_per_rank: int) -> str | None:
        """Why a per-rank batch of this size cannot hold every group's share, or None when it can.

        Every group needs at least one whole sample of its share in every per-rank batch
        (batch × share ≥ 1): then, whatever the number of ranks, each rank's batch holds each group.
        """
        if min(batch_size_per_rank * s for s in self.group_shares) >= 1 - 1e-9:
            return None
        if self.balance == "teacher_domains":
            n = len(self.domains)
            return (
                f"balance=teacher_domains gives each of the {n} teacher domains ({', '.join(self.domains)}) "
                f"1/{n} of every per-rank batch, so the per-rank batch must be at least {n}"
            )
        smallest = min(range(len(self.group_shares)), key=lambda g: self.group_shares[g])
        share = self.group_shares[smallest]
        return (
            f"balance=weights gives {self.group_names[smallest]} a share of {share:.4g} of every batch; "
            f"a per-rank batch of {batch_size_per_rank} cannot hold one sample of it: use a per-rank "
            f"batch of at least {math.ceil(1 / share - 1e-9)} or raise its weight"
        )


def _spec_dir() -> Traversable:
    """The named mixture specs, as package data (works from a wheel as from a checkout)."""
    return importlib.resources.files("dune_scale") / "configs" / "data"


def available_mixtures() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _spec_dir().iterdir() if p.name.endswith(".yaml"))


def resolve_mixture(mixture: str | Sequence[dict[str, Any]], balance: str, remote_root: str) -> Mixture:
    """Mixture name or inline list + balance → :class:`Mixture` with every dataset's batch share.

    Sizes missing from the spec are read from ``<remote_root>/<name>/index.json`` when the root is a
    local path and the size matters (several datasets share a group); nothing remote is contacted.
    """
    if balance not in BALANCES:
        raise MixtureError(f"balance {balance!r} is unknown; choose one of {' | '.join(BALANCES)}")
    entries = _load_entries(mixture)
    names = [e["name"] for e in entries]
    domains = tuple(dict.fromkeys(e["domain"] for e in entries))
    weighted = [e["name"] for e in entries if e.get("weight") is not None]
    if balance == "weights":
        missing = [n for n in names if n not in weighted]
        if missing:
            raise MixtureError(f"balance=weights needs a weight for every dataset; missing for {', '.join(missing)}")
        group_of = {n: i for i, n in enumerate(names)}
        group_names = tuple(names)
        group_shares = [float(e["weight"]) for e in entries]
    else:
        if weighted:
            raise MixtureError(
                f"weights are only used with balance=weights (balance is {balance}); "
                f"remove them from {', '.join(weighted)} or set data.balance=weights"
            )
        if balance == "teacher_domains":
            group_of = {e["name"]: domains.index(e["domain"]) for e in entries}
            group_names = domains
            group_shares = [1.0] * len(domains)
        else:
            group_of = {n: 0 for n in names}
            group_names = ("all",)
            group_shares = [1.0]
    total_share = sum(group_shares)
    group_shares = [s / total_share for s in group_shares]

    sizes = {e["name"]: e.get("size") for e in entries}
    members = [[n for n in names if group_of[n] == g] for g in range(len(group_names))]
    for group in members:
        if len(group) > 1:
            for name in group:
                if sizes[name] is None:
                    sizes[name] = _size_from_index(remote_root, name)

    streams = []
    for e in entries:
        name = e["name"]
        g = group_of[name]
        group = members[g]
        within = 1.0 if len(group) == 1 else sizes[name] / sum(sizes[n] for n in group)
        streams.append(
            MixtureStream(
                name=name,
                domain=e["domain"],
                size=sizes[name],
                proportion=group_shares[g] * within,
                group=g,
                val_size=e.get("val_size"),
            )
        )
    return Mixture(tuple(streams), domains, balance, tuple(group_names), tuple(group_shares))


def _load_entries(mixture: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(mixture, str):
        path = _spec_dir() / f"{mixture}.yaml"
        if not path.is_file():
            known = ", ".join(available_mixtures()) or "none"
            raise MixtureError(f"no mixture named {mixture!r} (known: {known}; or give an inline list)")
        spec = yaml.safe_load(path.read_text()) or {}
        raw = spec.get("datasets")
        where = str(path)
    else:
        raw, where = mixture, "inline mixture"
    if not isinstance(raw, (list, tuple)) or not raw:
        raise MixtureError(f"{where}: expected a non-empty list of {{name, domain, size?, weight?}} entries")
    entries = [_check_entry(item, i, where) for i, item in enumerate(raw)]
    names = [e["name"] for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MixtureError(f"{where}: dataset {duplicates[0]!r} is listed more than once")
    return entries


def _check_entry(item: Any, i: int, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise MixtureError(f"{where}: entry {i} must be a mapping with name and domain, got {item!r}")
    unknown = sorted(set(item) - _ENTRY_KEYS)
    if unknown:
        raise MixtureError(f"{where}: entry {i} has unknown key {unknown[0]!r}; allowed: {', '.join(sorted(_ENTRY_KEYS))}")
    for key in ("name", "domain"):
        value = item.get(key)
        if not isinstance(value, str) or not is_plain_name(value):
            raise MixtureError(f"{where}: entry {i} needs a {key} (a folder name: not empty, no '/', not '..'), got {value!r}")
    for key in ("size", "val_size"):
        value = item.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise MixtureError(f"{where}: {item['name']}.{key} must be a positive integer, got {value!r}")
    weight = item.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0):
        raise MixtureError(f"{where}: {item['name']}.weight must be a positive number, got {weight!r}")
    return dict(item)


def _size_from_index(remote_root: str, name: str) -> int:
    if "://" not in remote_root and not Path(remote_root).is_dir():
        raise MissingDataError.for_root(remote_root)
    index = Path(remote_root) / name / "index.json"
    if "://" in remote_root or not index.is_file():
        raise MixtureError(
            f"dataset {name} has no size and it is needed to weight it inside its group; give its "
            f"size in the mixture (it is only read from a local {os.path.join(remote_root, name, 'index.json')})"
        )
    return sum(shard["samples"] for shard in index_shards(index, name))
