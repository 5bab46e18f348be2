"""Preparing the whole mixture in one command: SOURCES.yaml → one MDS folder per dataset and split.

SOURCES.yaml says where each dataset of the mixture lives, in the terms of naver/dune's
``data/paths.py`` (dataset roots, the ImageNet-19k list pickle, ``mast3r_cache``, ``ubody_pkl``);
``official_layouts`` turns each into the files its official loader reads, for each split the
official code has. Every split is converted with the converter's chunks (``convert.py``): chunk k
of a split becomes shard k, stored with a marker that holds its index entry. So

* a rerun keeps every chunk whose marker matches its files and settings, and skips a split whose
  index.json records the same sources and settings: resumable after a kill at any moment;
* ``--part I/N`` converts the chunks k with k mod N == I: N machines write disjoint shards into the
  same folders, and whichever finds every chunk's marker there (the last part to finish a split,
  or ``--merge``) joins their index entries in chunk order. That is the join Streaming's
  ``merge_index`` does, without its per-part subfolders, so N parts write the files one run writes.

Each split's record (images found, written, skipped and left out with reasons, bytes, settings,
the recipe's official count and a flag where they differ) goes into its index.json under
``preparation`` and into ``OUT/prepare_report.json``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from dune_scale.data.convert import (
    DEFAULT_MAX_PIXELS,
    ROTATIONS,
    ConvertReport,
    ImagePolicy,
    convert_chunks,
    open_output,
    plan_chunks,
    write_index,
    write_json,
)
from dune_scale.data.mixture import resolve_mixture
from dune_scale.data.official_layouts import (
    MAST3R_DATASETS,
    OFFICIAL_GETTERS,
    SOURCE_KEYS,
    Listing,
    Reader,
    check_inputs,
    reader_for,
)
from dune_scale.data.remote import check_bucket
from dune_scale.object_store import s3_endpoint

REPORT = "prepare_report.json"
PART_REPORT = "prepare_report.part-{index}-of-{count}.json"


class PrepareError(ValueError):
    """Input that cannot be prepared as asked (the message names the key, file or dataset)."""


class CountMismatch(PrepareError):
    """``--strict-counts``: a split's image count differs from the recipe's official one."""


@dataclass(frozen=True)
class Part:
    """This run's share: chunks ``k`` with ``k % count == index`` of every split."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Part:
        index, _, count = text.partition("/")
        if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
            raise PrepareError(
                f"--part {text!r}: expected I/N with 0 <= I < N (I counts from 0, like SLURM_ARRAY_TASK_ID with --array=0-<N-1>)"
            )
        return cls(int(index), int(count))

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index


@dataclass(frozen=True)
class Settings:
    """How images are stored; recorded per split, and a change re-converts."""

    samples_per_shard: int = 512
    max_side: int = 0  # longer side at most this many pixels (0: images kept as they are)
    max_pixels: int = DEFAULT_MAX_PIXELS
    quality: int | None = None

    def check(self) -> None:
        if self.samples_per_shard < 1:
            raise PrepareError(f"--samples-per-shard must be at least 1, got {self.samples_per_shard}")
        if self.max_side < 0 or self.max_pixels < 0:
            raise PrepareError(f"--max-side and --max-pixels must be 0 (no limit) or positive, got {self.max_side}, {self.max_pixels}")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise PrepareError(f"--quality must be between 1 and 100, got {self.quality}")

    def policy(self, name: str) -> ImagePolicy:
        return ImagePolicy(self.quality, self.max_pixels, ROTATIONS.get(name.lower(), ()), self.max_side)

    def recorded(self, reader: Reader) -> dict[str, Any]:
        """What a finished split records and a rerun compares: where the files came from, and these settings."""
        return {"read": reader.describe(), **asdict(self)}


@dataclass(frozen=True)
class Job:
    """One split of one dataset."""

    name: str
    split: str
    reader: Reader
    official: int | None  # the recipe's count (configs/data/<mixture>.yaml size / val_size)


@dataclass
class SplitRecord:
    """What happened to one split in this run, and what the split holds once complete."""

    dataset: str
    split: str
    status: str  # converted | complete | partial | outdated | not prepared
    preparation: dict[str, Any] | None = None  # the record index.json keeps, once complete
    shards: int = 0  # chunks of the split
    missing: list[int] = field(default_factory=list)  # chunks without a matching marker yet
    converted: int = 0  # images this run converted (written or skipped)
    converted_bytes: int = 0
    reused: int = 0  # chunks kept from earlier runs
    seconds: float = 0.0  # converting
    listing_seconds: float = 0.0

    @property
    def flag(self) -> str | None:
        return self.preparation["flag"] if self.preparation else None


@dataclass
class PrepareReport:
    """What a run did and what OUT holds; ``prepare_report.json`` (a part's own file as well)."""

    out: str
    mixture: str
    part: str
    settings: dict[str, Any]
    splits: list[SplitRecord]
    missing_datasets: list[str]  # mixture datasets SOURCES does not name
    ignored_datasets: list[str]  # datasets SOURCES names outside the mixture
    workers: int
    seconds: float = 0.0
    written_to: list[str] = field(default_factory=list)  # the report files this run wrote

    @property
    def complete(self) -> bool:
        return all(r.status in ("converted", "complete") for r in self.splits)

    def speed(self) -> dict[str, float]:
        """This run's conversion speed (chunks kept from earlier runs excluded)."""
        images = sum(r.converted for r in self.splits)
        mb = sum(r.converted_bytes for r in self.splits) / 1e6
        seconds = sum(r.seconds for r in self.splits)
        per_s = images / seconds if seconds else 0.0
        return {
            "images": images, "megabytes": round(mb, 3), "seconds": round(seconds, 3),
            "listing_seconds": round(sum(r.listing_seconds for r in self.splits), 3),
            "images_per_s": round(per_s, 2), "mb_per_s": round(mb / seconds if seconds else 0.0, 3),
            "images_per_s_per_worker": round(per_s / self.workers, 2),
        }  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "out": self.out, "mixture": self.mixture, "part": self.part, "settings": self.settings,
            "complete": self.complete, "missing_from_sources": self.missing_datasets,
            "not_in_mixture": self.ignored_datasets,
            "flags": [f"{r.dataset}/{r.split}: {r.flag}" for r in self.splits if r.flag],
            "run": {"workers": self.workers, "wall_seconds": round(self.seconds, 3), **self.speed()},
            "splits": [asdict(r) for r in self.splits],
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# SOURCES.yaml


def load_sources(path: str) -> dict[str, Any]:
    """SOURCES.yaml → {key: path}: dataset names of the official loaders and ``mast3r_cache`` /
    ``ubody_pkl``, as in naver/dune's data/paths.py. Relative paths are read from the file's folder;
    ``~`` and ``$VARIABLES`` are expanded."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PrepareError(f"SOURCES {path}: cannot be read: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise PrepareError(f"SOURCES {path}: expected a mapping of dataset name → path, got {type(raw).__name__}")
    base = os.path.dirname(os.path.abspath(path))
    sources: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in OFFICIAL_GETTERS and key not in SOURCE_KEYS:
            raise PrepareError(
                f"SOURCES {path}: unknown key {key!r}; allowed: the datasets of the official loaders "
                f"({', '.join(OFFICIAL_GETTERS)}) and {', '.join(SOURCE_KEYS)}"
            )
        if key in MAST3R_DATASETS and value in (None, ""):
            sources[key] = ""  # no root of its own: the cache pickle's root must be a folder (data/paths.py leaves them "")
            continue
        values = value if key == "in1k" and isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise PrepareError(f"SOURCES {path}: {key} must be a path (a non-empty string), got {value!r}")
        resolved = [os.path.join(base, os.path.expandvars(os.path.expanduser(v))) for v in values]
        sources[key] = resolved if isinstance(value, list) else resolved[0]
    return sources


@dataclass
class Plan:
    jobs: list[Job]  # the splits to prepare, mixture order, train before val
    others: list[tuple[str, str]]  # splits of mixture datasets SOURCES names that --only leaves out
    missing: list[str]  # mixture datasets SOURCES does not name
    ignored: list[str]  # datasets SOURCES names outside the mixture


def plan_jobs(sources: dict[str, Any], mixture: str, only: Sequence[str] | None) -> Plan:
    """The splits to prepare, each folder and file they open checked first (every problem in one error)."""
    streams = resolve_mixture(mixture, "teacher_domains", "").streams
    names = [s.name for s in streams]
    without_rule = [n for n in names if n not in OFFICIAL_GETTERS]
    if without_rule:
        raise PrepareError(f"mixture {mixture}: no official loader for {', '.join(without_rule)}; prepare those with convert_data.py")
    unknown = [n for n in only or () if n not in names]
    if unknown:
        raise PrepareError(f"--only: {', '.join(unknown)} not in the mixture {mixture} ({', '.join(names)})")
    absent = [n for n in only or () if n not in sources]
    if absent:
        raise PrepareError(f"--only: {', '.join(absent)} not in SOURCES")
    plan = Plan([], [], [n for n in names if n not in sources], [n for n in sources if n in OFFICIAL_GETTERS and n not in names])
    problems = []
    for stream in (s for s in streams if s.name in sources):
        splits = (("train", stream.size), ("val", stream.val_size))
        if only and stream.name not in only:
            plan.others += [(stream.name, split) for split, size in splits if split == "train" or size is not None]
            continue
        for split, official in splits:
            try:
                reader = reader_for(sources, stream.name, split)
                if reader is not None:
                    check_inputs(reader, stream.name, split)
                    plan.jobs.append(Job(stream.name, split, reader, official))
            except ValueError as err:
                problems.append(str(err))
    if problems:
        raise PrepareError("; ".join(problems))
    return plan


# ---------------------------------------------------------------------------------------------
# One split


def split_url(out: str, name: str, split: str) -> str:
    return f"{out.rstrip('/')}/{name}" + ("/val" if split == "val" else "")


def _skip_reason(error: str) -> str:
    """The converter's skip message without the file-specific part (counted by reason)."""
    return error.split(":", 1)[0]


def _preparation(job: Job, listing: Listing, report: ConvertReport, markers: Sequence[dict[str, Any]], recorded: dict[str, Any]) -> dict[str, Any]:
    found, written = len(listing.files), report.written
    flag = None
    if job.official is not None and written != job.official:
        flag = f"{written:,} images written where the recipe counts {job.official:,} ({found:,} found, {found - written:,} skipped)"
    return {
        "dataset": job.name, "split": job.split, "settings": recorded,
        "found": found, "written": written, "official": job.official, "flag": flag,
        "skipped": dict(Counter(_skip_reason(s["error"]) for s in report.skipped)),
        "left_out": listing.excluded, "left_out_examples": listing.examples, "notes": listing.notes,
        "bytes": sum(m["shard"]["raw_data"]["bytes"] for m in markers if m["shard"]), "shards": report.shards,
        "rotated": report.rotated, "reencoded": report.reencoded, "resized": sum(m.get("resized", 0) for m in markers),
    }  # fmt: skip


def _finished(output: Any, recorded: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """``complete`` with the split's record when its index.json records these settings (``recorded``
    None: any), ``outdated`` when other ones, else ``not prepared``."""
    index = output.read_json("index.json")
    block = index.get("preparation") if isinstance(index, dict) else None
    if block is None:
        return "not prepared", None
    return ("complete" if recorded is None or block.get("settings") == recorded else "outdated"), block


def prepare_split(job: Job, out: str, settings: Settings, part: Part, *, merge: bool, workers: int | None,
                  endpoint: str | None, timeout: float, strict_counts: bool, progress: bool) -> SplitRecord:
    """Convert this part's chunks of one split (none with ``merge``); join the index once every chunk is there."""
    record = SplitRecord(job.name, job.split, "partial")
    recorded = settings.recorded(job.reader)
    with open_output(split_url(out, job.name, job.split), endpoint, timeout, check=False) as output:
        status, block = _finished(output, recorded)
        if status == "complete":
            record.status, record.preparation = status, block
            return record
        start = time.monotonic()
        listing = job.reader.list()
        record.listing_seconds = time.monotonic() - start
        if strict_counts and job.official is not None and len(listing.files) != job.official:
            raise CountMismatch(
                f"{job.name} ({job.split}): its official loader finds {len(listing.files):,} images where the recipe "
                f"counts {job.official:,} (--strict-counts); read as {job.reader.describe()}"
            )
        chunks = plan_chunks(listing.files, listing.root, settings.policy(job.name), settings.samples_per_shard)
        mine = [] if merge else [c for c in chunks if part.owns(c.number)]
        start = time.monotonic()
        markers, reused = convert_chunks(mine, job.name, output, workers=workers, progress=progress, label=f"{job.name}/{job.split}")
        record.seconds = time.monotonic() - start
        fresh = [m for n, m in markers.items() if n not in reused]
        record.converted = sum(m["written"] + len(m["skipped"]) for m in fresh)
        record.converted_bytes = sum(m["shard"]["raw_data"]["bytes"] for m in fresh if m["shard"])
        record.reused, record.shards = len(reused), len(chunks)
        others = {c.number for c in chunks} - set(markers)
        present = output.stored_chunks() if others else set()
        if others <= present:  # other parts' markers are read, and their files' sizes checked, once all are there
            stored = output.markers(others) if others else {}
            markers.update({n: m for n, m in stored.items() if m.get("sources") == chunks[n].digest})
            record.missing = [c.number for c in chunks if c.number not in markers]
        else:
            record.missing = sorted(others - present)
        if record.missing:
            return record
        ordered = [markers[c.number] for c in chunks]
        report = ConvertReport.from_markers(job.name, output.url, len(listing.files), ordered, len(reused))
        record.preparation = _preparation(job, listing, report, ordered, recorded)
        write_index(output, ordered, report, preparation=record.preparation)
        record.status = "converted"
    return record


def refresh(
    record: SplitRecord, recorded: dict[str, Any] | None, out: str, endpoint: str | None, timeout: float
) -> SplitRecord:
    """A split this run did not complete, as its index.json says now (another part may have joined it)."""
    with open_output(split_url(out, record.dataset, record.split), endpoint, timeout, check=False) as output:
        status, block = _finished(output, recorded)
    if status != "not prepared" or record.status == "not prepared":
        record.status, record.preparation = status, block
    return record


# ---------------------------------------------------------------------------------------------
# The mixture


def prepare_mixture(
    sources_file: str,
    out: str,
    *,
    mixture: str = "teacher_balanced",
    only: Sequence[str] | None = None,
    part: Part = Part(),
    merge: bool = False,
    settings: Settings = Settings(),
    workers: int | None = None,
    s3_endpoint_url: str | None = None,
    timeout: float = 60.0,
    strict_counts: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Prepare every split of the mixture's datasets that SOURCES names (or ``only`` those); write the
    report (``prepare_report.json`` when complete, a single run or ``merge``; a part's own otherwise).
    An ``s3://`` output is reached at ``s3_endpoint_url``, else the launch environment's
    ``S3_ENDPOINT_URL``, else AWS."""
    settings.check()
    if workers is not None and workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {workers}")
    if merge and part.count > 1:
        raise PrepareError("--merge joins the parts' shards; give it without --part")
    start = time.monotonic()
    plan = plan_jobs(load_sources(sources_file), mixture, only)
    endpoint = s3_endpoint(s3_endpoint_url)
    check_bucket(out, endpoint, timeout)
    records = []
    for job in plan.jobs:
        record = prepare_split(job, out, settings, part, merge=merge, workers=workers, endpoint=endpoint, timeout=timeout,
                               strict_counts=strict_counts, progress=progress)  # fmt: skip
        records.append(record)
    records = [r if r.status in ("converted", "complete") else refresh(r, settings.recorded(j.reader), out, endpoint, timeout) for r, j in zip(records, plan.jobs)]
    if strict_counts and any(r.flag for r in records):
        flagged = "; ".join(f"{r.dataset} ({r.split}): {r.flag}" for r in records if r.flag)
        raise CountMismatch(f"--strict-counts: {flagged}")
    records += [refresh(SplitRecord(name, split, "not prepared"), None, out, endpoint, timeout) for name, split in plan.others]
    report = PrepareReport(out, mixture, f"{part.index}/{part.count}", asdict(settings), records, plan.missing,
                           plan.ignored, workers or os.cpu_count() or 1, time.monotonic() - start)  # fmt: skip
    if part.count > 1:
        report.written_to.append(PART_REPORT.format(index=part.index, count=part.count))
    if part.count == 1 or report.complete:
        report.written_to.append(REPORT)
    with open_output(out, endpoint, timeout, check=False) as root:
        for name in report.written_to:
            write_json(root, name, report.to_json())
    report.written_to = [f"{out.rstrip('/')}/{name}" for name in report.written_to]
    return report


def _cell(preparation: dict[str, Any], key: str) -> str:
    value = preparation.get(key)
    if isinstance(value, dict):
        value = sum(value.values())
    return "-" if value is None else f"{value:,}"


def format_report(report: PrepareReport) -> list[str]:
    """The console table: one line per split, then flags, reasons, notes, what SOURCES lacks and the speed."""
    header = f"{'dataset':<16} {'split':<5} {'found':>11} {'written':>11} {'skipped':>8} {'left out':>9} {'MB':>10} {'official':>11}  status"
    lines = [header, "-" * len(header)]
    for r in report.splits:
        p = r.preparation or {}
        mb = f"{p['bytes'] / 1e6:,.1f}" if p else "-"
        status = r.status if r.status != "partial" else f"partial ({r.shards - len(r.missing)}/{r.shards} shards)"
        cells = " ".join(f"{_cell(p, key):>{width}}" for key, width in (("found", 11), ("written", 11), ("skipped", 8), ("left_out", 9)))
        lines.append(f"{r.dataset:<16} {r.split:<5} {cells} {mb:>10} {_cell(p, 'official'):>11}  {status}{'  DIFFERS' if r.flag else ''}")
    for r in report.splits:
        p = r.preparation or {}
        if r.flag:
            lines.append(f"differs from the recipe: {r.dataset}/{r.split}: {r.flag}")
        reasons = {**p.get("skipped", {}), **{f"left out: {k}": v for k, v in p.get("left_out", {}).items()}}
        lines += [f"  {r.dataset}/{r.split}: {count:,} {reason}" for reason, count in reasons.items()]
        lines += [f"  {r.dataset}/{r.split}: {note}" for note in p.get("notes", [])]
    if report.missing_datasets:
        lines.append(f"missing from SOURCES: {', '.join(report.missing_datasets)}")
    if report.ignored_datasets:
        lines.append(f"in SOURCES but not in the mixture {report.mixture} (ignored): {', '.join(report.ignored_datasets)}")
    speed = report.speed()
    lines.append(
        f"this run (part {report.part}): {speed['images']:,} images converted in {speed['seconds']:.1f} s: "
        f"{speed['images_per_s']:.1f} images/s, {speed['mb_per_s']:.1f} MB/s ({report.workers} workers: "
        f"{speed['images_per_s_per_worker']:.1f} images/s each); listing {speed['listing_seconds']:.1f} s"
    )
    return lines
