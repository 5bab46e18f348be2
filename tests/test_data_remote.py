"""Conversion and streaming against a real S3 server (SeaweedFS on 127.0.0.1, credentials enforced)."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest_data import DataCfg, SeaweedS3, batches_of, train_loader, val_loader
from dune_scale.data.convert import convert_dataset, list_sources
from dune_scale.data.remote import RemoteStream, ShardIntegrityError, StorageAccessError

pytestmark = [pytest.mark.service, pytest.mark.usefixtures("private_tmp")]

DOMAINS = (("photos", "dino2"), ("scenes", "mast3r"), ("people", "multihmr"))
BAD_FILES = ("broken.jpg", "truncated.jpg")


def make_image_folder(root: Path, seed: int, per_class: int = 12) -> Path:
    """ImageFolder layout: two classes of JPEG and PNG images, plus a corrupt and a truncated file."""
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            image = Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8))
            image.save(root / cls / f"{i:03}.{'png' if i % 4 == 0 else 'jpg'}")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    good = (root / "b" / "001.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "b" / "README.txt").write_text("not an image; ignored by the imagefolder layout")
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    return {name: make_image_folder(base / name, seed) for seed, (name, _) in enumerate(DOMAINS)}


def convert_all(root: str, sources: dict[str, Path]) -> str:
    for name, source in sources.items():
        report = convert_dataset(str(source), root, name, samples_per_shard=3, workers=2, progress=False)
        assert report.written == 24 and report.files == 26
    return root


@pytest.fixture(scope="module")
def converted(s3_env: SeaweedS3, sources: dict[str, Path]) -> str:
    """The three datasets converted into the test bucket (read-only for the tests); the root URL."""
    return convert_all(f"s3://{s3_env.bucket}/shared", sources)


def mixture() -> list[dict[str, Any]]:
    return [{"name": n, "domain": d} for n, d in DOMAINS]


def test_convert_to_s3_skips_bad_files_reports_them_and_resumes(s3_env: SeaweedS3, sources: dict[str, Path]) -> None:
    root = f"s3://{s3_env.bucket}/convert"
    source = sources["photos"]
    assert len(list_sources(str(source))) == 26  # README.txt is not an image
    report = convert_dataset(str(source), root, "photos", samples_per_shard=6, workers=2, progress=False)
    assert (report.files, report.written, report.shards, report.chunks_reused) == (26, 24, 5, 0)
    assert report.reencoded == 0  # the PNGs are kept as they are (lossless)
    assert sorted(Path(s["path"]).name for s in report.skipped) == sorted(BAD_FILES)
    client = s3_env.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_env.bucket, Prefix="convert/photos/")["Contents"]}
    assert {f"convert/photos/shard.{k:05}.mds" for k in range(5)} <= keys
    stored = json.loads(client.get_object(Bucket=s3_env.bucket, Key="convert/photos/convert_report.json")["Body"].read())
    assert stored["written"] == 24 and len(stored["skipped"]) == 2
    index = json.loads(client.get_object(Bucket=s3_env.bucket, Key="convert/photos/index.json")["Body"].read())
    assert sum(s["samples"] for s in index["shards"]) == 24
    assert all("xxh64" in s["raw_data"]["hashes"] for s in index["shards"])

    client.delete_object(Bucket=s3_env.bucket, Key="convert/photos/.convert/chunk.00002.json")
    again = convert_dataset(str(source), root, "photos", samples_per_shard=6, workers=2, progress=False)
    assert (again.chunks_reused, again.written, again.shards) == (4, 24, 5)  # only chunk 2 redone
    assert json.loads(client.get_object(Bucket=s3_env.bucket, Key="convert/photos/index.json")["Body"].read()) == index


def test_local_conversion_resumes_and_reads_back(tmp_path: Path, sources: dict[str, Path]) -> None:
    out = tmp_path / "mds"
    convert_dataset(str(sources["people"]), str(out), "people", samples_per_shard=8, workers=1, progress=False)
    shard = out / "people" / "shard.00001.mds"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "people").glob("shard.*.mds")}
    shard.unlink()
    (out / "people" / ".convert" / "chunk.00001.json").unlink()
    report = convert_dataset(str(sources["people"]), str(out), "people", samples_per_shard=8, workers=2, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "people").glob("shard.*.mds")}
    assert report.chunks_reused == len(before) - 1
    assert {k: v for k, v in after.items() if k != shard.name} == {k: v for k, v in before.items() if k != shard.name}
    loader = train_loader(
        DataCfg(str(out), [{"name": "people", "domain": "multihmr"}]), image_size=16, batch_size=4, seed=0
    )
    indices = sorted(int(i) for b in batches_of(loader) for i in b["index"])
    assert len(indices) == 24 and len(set(indices)) == 24


def test_stream_from_s3_with_two_workers_fresh_caches(converted: str, tmp_path: Path) -> None:
    """Fresh-cache epochs with forked workers: no stalled or garbled download (the NOTES.md bug).

    Workers that share the parent's boto3 connection stall for exactly ``download_timeout`` (the
    client's retries then hide it) and get garbled shards (checksums catch them): so no client may
    survive into a fork, and no epoch may last a timeout.
    """
    expected = {(name, i) for name, _ in DOMAINS for i in range(26) if i not in (12, 25)}  # minus bad files
    stall_s = 20  # an epoch takes ~1 s; a stall lasts exactly the timeout (kept far above a busy machine's epoch)
    for run in range(4):
        cache = str(tmp_path / f"cache{run}")
        cfg = DataCfg(converted, mixture(), local_cache=cache, download_timeout=stall_s, download_retry=0)
        loader = train_loader(cfg, image_size=16, batch_size=6, seed=run)
        assert all(stream._downloader._s3_client is None for stream in loader.dataset.streams)
        start = time.monotonic()
        batches = batches_of(loader)
        assert time.monotonic() - start < stall_s
        seen = Counter((d, int(i)) for b in batches for d, i in zip(b["dataset"], b["index"]))
        assert set(seen) == expected and set(seen.values()) == {1}
        assert all(Counter(b["dataset"]) == Counter({n: 2 for n, _ in DOMAINS}) for b in batches)
        assert any((tmp_path / f"cache{run}" / "photos").glob("shard.*.mds"))


def test_cache_limit_streams_through_a_small_disk(converted: str, tmp_path: Path) -> None:
    """~150 kB of shards through a 40 kB cache (Streaming needs ≥ 4 × the largest shard, ~7 kB)."""
    cache = tmp_path / "cache"
    cfg = DataCfg(converted, mixture(), local_cache=str(cache), cache_limit="40kb", num_workers=1)
    loader = train_loader(cfg, image_size=16, batch_size=6, seed=0)
    assert sum(len(b["index"]) for b in batches_of(loader)) == 72
    assert sum(p.stat().st_size for p in cache.rglob("shard.*.mds")) <= 40_000


def test_wrong_credentials_fail_with_a_clear_message(
    converted: str, s3_env: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sources: dict[str, Path]
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    cfg = DataCfg(converted, mixture(), local_cache=str(tmp_path / "cache"))
    with pytest.raises(StorageAccessError, match="access denied / bad credentials"):
        train_loader(cfg, image_size=16, batch_size=6, seed=0)
    stream = RemoteStream(endpoint=s3_env.endpoint, remote=f"{converted}/photos", local=str(tmp_path / "direct"), download_retry=3, download_timeout=5)
    start = time.monotonic()
    with pytest.raises(StorageAccessError, match="access denied / bad credentials"):
        stream._download_file("index.json")
    assert time.monotonic() - start < 2  # a 403 is not retried
    with pytest.raises(StorageAccessError, match="access denied / bad credentials"):
        convert_dataset(str(sources["photos"]), converted, "again", samples_per_shard=6, workers=1, progress=False)


def test_damaged_shard_is_downloaded_again_then_named(
    s3_env: SeaweedS3, sources: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = f"s3://{s3_env.bucket}/damaged"
    convert_dataset(str(sources["scenes"]), root, "scenes", samples_per_shard=6, workers=1, progress=False)
    client = s3_env.client()
    key = "damaged/scenes/shard.00001.mds"
    data = bytearray(client.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=s3_env.bucket, Key=key, Body=io.BytesIO(bytes(data)))
    cfg = DataCfg(root, [{"name": "scenes", "domain": "mast3r"}], local_cache=str(tmp_path / "cache"), num_workers=0)
    loader = train_loader(cfg, image_size=16, batch_size=6, seed=0)
    with caplog.at_level(logging.WARNING), pytest.raises(ShardIntegrityError, match=f"{root}/scenes/shard.00001.mds"):
        batches_of(loader)
    assert "downloading it again" in caplog.text


def test_train_tiny_cpu_from_s3_with_two_workers(s3_env: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's end-to-end check: generated images (a few corrupt) → s3:// → tiny_cpu training,
    the endpoint given only as data.s3_endpoint_url: the access check, the parent and the forked
    loader workers all reach it without anything written into the environment."""
    from conftest import TINY_CPU, tiny_overrides
    from dune_scale.cli.train import train
    from dune_scale.config import load_config
    from dune_scale.data.synthetic import DEMO_DATASETS, synthetic_image
    from dune_scale.telemetry.metrics import read_metrics

    root = f"s3://{s3_env.bucket}/train"
    rng = np.random.default_rng(0)
    for name, _ in DEMO_DATASETS:
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for i in range(40):
            synthetic_image(rng, 64).save(folder / f"{i:03}.jpg", quality=90)
        (folder / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff corrupt")
        report = convert_dataset(str(folder), root, name, samples_per_shard=16, workers=2, progress=False)
        assert report.written == 40 and [Path(s["path"]).name for s in report.skipped] == ["zz_corrupt.jpg"]
    out = tmp_path / "run"
    overrides = tiny_overrides(out, Path("unused"), "train.max_steps=3", "checkpoint.every_steps=3")
    overrides += [
        f"data.remote_root={root}",
        f"data.local_cache={tmp_path / 'cache'}",
        f"data.s3_endpoint_url={s3_env.endpoint}",
        "data.num_workers=2",
    ]
    monkeypatch.delenv("S3_ENDPOINT_URL")
    train(load_config(TINY_CPU, overrides))
    assert "S3_ENDPOINT_URL" not in os.environ
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert any((tmp_path / "cache" / name).glob("shard.*.mds") for name, _ in DEMO_DATASETS)


def test_val_split_converted_to_s3_and_read_back_in_order(s3_env: SeaweedS3, sources: dict[str, Path], tmp_path: Path) -> None:
    """``--split val`` writes ``<root>/<name>/val``; the validation loader reads it from S3, each image once."""

    root = f"s3://{s3_env.bucket}/splits"
    report = convert_dataset(str(sources["people"]), root, "people", split="val", samples_per_shard=8, workers=1, progress=False)
    assert report.output == f"{root}/people/val" and report.written == 24
    cfg = DataCfg(root, [{"name": "people", "domain": "multihmr", "val_size": 24}], local_cache=str(tmp_path / "cache"))
    batches = batches_of(val_loader(cfg, "people", image_size=16, batch_size=5))
    assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 4]
    assert sorted(int(i) for b in batches for i in b["index"]) == [i for i in range(26) if i not in (12, 25)]
    assert list((tmp_path / "cache" / "people" / "val").glob("shard.*.mds"))


def test_prepare_parts_to_s3_write_what_one_local_run_writes(s3_env: SeaweedS3, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """launch/prepare_data.py to s3://: two parts (the last joins), then a rerun that skips; the
    bucket holds the files one local run writes."""
    import yaml

    from dune_scale.cli.prepare_data import main

    rng = np.random.default_rng(0)
    for path in ("train/a.png", "train/s/b.jpg", "train/c.jpg", "train/.hidden.png", "validation/v.png"):
        (tmp_path / "agora" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "agora" / path)
    (tmp_path / "SOURCES.yaml").write_text(yaml.safe_dump({"agora": str(tmp_path / "agora")}))
    common = [str(tmp_path / "SOURCES.yaml"), "--workers", "1", "--no-progress", "--samples-per-shard", "2"]
    local = tmp_path / "local"
    assert main([common[0], str(local), *common[1:]]) == 0
    url = f"s3://{s3_env.bucket}/prepare"
    for part in ("0/2", "1/2", "0/2"):
        assert main([common[0], url, *common[1:], "--part", part]) == 0
    assert "agora            train           3           3        0         1" in capsys.readouterr().out
    client = s3_env.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_env.bucket, Prefix="prepare/")["Contents"]]
    stored = {k.removeprefix("prepare/"): client.get_object(Bucket=s3_env.bucket, Key=k)["Body"].read()
              for k in keys if k.endswith((".mds", "/index.json"))}  # fmt: skip
    expected = {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.suffix == ".mds" or p.name == "index.json"}
    assert stored == expected and len(expected) == 5  # 2 + 1 shards, 2 indexes
    report = json.loads(client.get_object(Bucket=s3_env.bucket, Key="prepare/prepare_report.part-0-of-2.json")["Body"].read())
    assert [s["status"] for s in report["splits"]] == ["complete", "complete"] and report["run"]["images"] == 0
