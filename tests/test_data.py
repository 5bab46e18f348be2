"""Data pipeline on local shards: synthetic MDS, mixtures, grouped batches, augmentation, resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from streaming import StreamingDataset
from streaming.base.world import World

from conftest_data import DataCfg, batches_of, resolved, train_loader, val_loader
from dune_scale.data import (
    CorruptImageError,
    MixtureError,
    build_train_transform,
    build_val_transform,
    decode_image,
    resolve_mixture,
    sample_generator,
    write_demo_shards,
    write_synthetic_dataset,
)
from dune_scale.data.batching import batch_counts, generate_work_grouped, worker_positions

# Streaming leaves lock files in the temp dir: every test gets its own.
pytestmark = pytest.mark.usefixtures("private_tmp")

DESIGN_SIZES = {
    "in19k": ("dino2", 13_153_480), "gldv2": ("dino2", 4_132_914), "mapillarystreet": ("dino2", 1_205_907),
    "ARKitScenesV2": ("mast3r", 456_108), "BlendedMVS": ("mast3r", 98_937), "Co3d_v3": ("mast3r", 185_100),
    "DL3DV": ("mast3r", 208_800), "Habitat512": ("mast3r", 284_965), "MegaDepthDense": ("mast3r", 36_949),
    "Niantic": ("mast3r", 41_300), "ScanNetppV2": ("mast3r", 60_188), "TartanAir": ("mast3r", 136_225),
    "Unreal4K": ("mast3r", 14_386), "VirtualKitti": ("mast3r", 1_200), "WildRgb": ("mast3r", 224_400),
    "bedlam": ("multihmr", 353_116), "agora": ("multihmr", 14_314), "cuffs": ("multihmr", 54_944),
    "ubody": ("multihmr", 54_234),
}
# An uneven 3-domain mixture: two dino2 datasets, one each for mast3r and multihmr.
UNEVEN = [("web_a", "dino2", 120), ("web_b", "dino2", 60), ("scenes", "mast3r", 90), ("people", "multihmr", 45)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo_shards(root, num_samples_per_dataset=40, image_size=48)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("uneven")
    for seed, (name, _, size) in enumerate(UNEVEN):
        write_synthetic_dataset(root, name, size, image_size=32, seed=seed, shard_size_limit=1 << 14)
    return root, [{"name": n, "domain": d, "size": s} for n, d, s in UNEVEN]


# --- synthetic shards -------------------------------------------------------------------------


def test_synthetic_dataset_round_trips(tmp_path: Path) -> None:
    folder = write_synthetic_dataset(tmp_path, "shapes", 50, image_size=40, seed=3, shard_size_limit=1 << 14)
    assert len(list(folder.glob("shard.*.mds"))) > 1
    dataset = StreamingDataset(local=str(folder), batch_size=1)
    assert dataset.num_samples == 50
    for i in range(50):
        sample = dataset[i]
        assert sample["dataset"] == "shapes" and sample["index"] == i
        assert sample["format"] == "jpeg" and sample["rotate"] == 0
        image = decode_image(sample["image"])
        assert image.shape == (3, 40, 40) and image.dtype == torch.uint8
        assert image.float().std() > 5  # not a flat image
    again = write_synthetic_dataset(tmp_path / "again", "shapes", 50, image_size=40, seed=3, shard_size_limit=1 << 14)
    assert sorted(p.read_bytes() for p in again.glob("*.mds")) == sorted(p.read_bytes() for p in folder.glob("*.mds"))


def test_write_demo_shards_returns_one_dataset_per_domain(demo: tuple[Path, list[dict[str, Any]]]) -> None:
    root, mixture = demo
    assert [m["domain"] for m in mixture] == ["dino2", "mast3r", "multihmr"]
    assert all((root / m["name"] / "index.json").is_file() and m["size"] == 40 for m in mixture)
    assert resolve_mixture("demo", "teacher_domains", str(root)).names == tuple(m["name"] for m in mixture)


def test_decode_image_rejects_garbage() -> None:
    with pytest.raises(CorruptImageError):
        decode_image(b"\xff\xd8\xff\xe0 definitely not an image")


# --- mixtures ---------------------------------------------------------------------------------


def test_teacher_balanced_mixture_follows_design() -> None:
    mixture = resolve_mixture("teacher_balanced", "teacher_domains", "s3://bucket/shards")
    assert len(mixture.streams) == 19
    assert {s.name: (s.domain, s.size) for s in mixture.streams} == DESIGN_SIZES
    assert mixture.domains == ("dino2", "mast3r", "multihmr")
    for domain in mixture.domains:
        members = [s for s in mixture.streams if s.domain == domain]
        assert sum(s.proportion for s in members) == pytest.approx(1 / 3)
        total = sum(s.size for s in members)
        for s in members:
            assert s.proportion == pytest.approx(s.size / total / 3)
    assert mixture.domain_of("bedlam") == "multihmr"
    assert {s.name: s.val_size for s in mixture.streams}["gldv2"] == 117_577
    assert mixture.batch_size_problem(128) is None


def test_in1k_and_proportional_mixtures() -> None:
    in1k = resolve_mixture("in1k", "teacher_domains", "data")
    assert [(s.name, s.size, s.proportion, s.val_size) for s in in1k.streams] == [("in1k", 1_281_167, 1.0, 50_000)]
    prop = resolve_mixture("teacher_balanced", "proportional", "data")
    total = sum(size for _, size in DESIGN_SIZES.values())
    assert prop.streams[0].proportion == pytest.approx(13_153_480 / total)
    assert prop.batch_size_problem(1) is None


def test_inline_mixture_with_weights() -> None:
    inline = [{"name": "a", "domain": "dino2", "weight": 3}, {"name": "b", "domain": "mast3r", "weight": 1}]
    mixture = resolve_mixture(inline, "weights", "unused")
    assert [s.proportion for s in mixture.streams] == [0.75, 0.25]
    assert mixture.batch_size_problem(4) is None
    assert "at least 4" in mixture.batch_size_problem(3)
    sized = resolve_mixture([{"name": "a", "domain": "x", "size": 30}, {"name": "b", "domain": "x", "size": 10}], "teacher_domains", "")
    assert [s.proportion for s in sized.streams] == [0.75, 0.25]


def test_mixture_sizes_read_from_local_index(uneven: tuple[Path, list[dict[str, Any]]]) -> None:
    root, mixture = uneven
    unsized = [{"name": m["name"], "domain": m["domain"]} for m in mixture]
    resolved = resolve_mixture(unsized, "teacher_domains", str(root))
    assert [s.size for s in resolved.streams] == [120, 60, None, None]  # single-dataset domains need none
    with pytest.raises(MixtureError, match="web_a has no size"):
        resolve_mixture(unsized, "teacher_domains", "s3://bucket/root")


@pytest.mark.parametrize(
    ("mixture", "balance", "message"),
    [
        ("nope", "teacher_domains", "no mixture named 'nope'"),
        ([{"name": "a", "domain": "d"}, {"name": "a", "domain": "d"}], "teacher_domains", "more than once"),
        ([{"name": "a"}], "teacher_domains", "needs a domain"),
        ([{"name": "a", "domain": "d", "colour": 1}], "teacher_domains", "unknown key 'colour'"),
        ([{"name": "a", "domain": "d", "weight": 1}], "teacher_domains", "only used with balance=weights"),
        ([{"name": "a", "domain": "d"}], "weights", "needs a weight for every dataset"),
        ([{"name": "a", "domain": "d", "size": -3}], "teacher_domains", "positive integer"),
        ("teacher_balanced", "sideways", "balance 'sideways' is unknown"),
    ],
)
def test_mixture_errors(mixture: Any, balance: str, message: str) -> None:
    with pytest.raises(MixtureError, match=message):
        resolve_mixture(mixture, balance, "data")


def test_batch_size_problem_messages() -> None:
    mixture = resolve_mixture("teacher_balanced", "teacher_domains", "data")
    problem = mixture.batch_size_problem(2)
    assert problem is not None and "at least 3" in problem and "dino2, mast3r, multihmr" in problem
    assert mixture.batch_size_problem(3) is None
    assert resolve_mixture("in1k", "teacher_domains", "data").batch_size_problem(1) is None


def test_batch_counts_round_each_share_and_rotate_the_rest() -> None:
    for total in range(3, 40):
        for shares in ([1, 1, 1], [0.7, 0.2, 0.1], [5, 1]):
            counts = batch_counts(30, total, shares)
            ideal = total * np.asarray(shares) / sum(shares)
            assert (counts.sum(axis=1) == total).all()
            assert (np.abs(counts - ideal) < 1).all()
            assert (np.abs(np.cumsum(counts, axis=0) - np.outer(np.arange(1, 31), ideal)) < 1 + 1e-9).all()
    assert batch_counts(3, 10, [1, 1, 1]).tolist() == [[4, 3, 3], [3, 4, 3], [3, 3, 4]]


# --- transforms -------------------------------------------------------------------------------


def test_train_transform_is_reproducible_from_its_generator() -> None:
    image = decode_image(_jpeg(60, 80))
    transform = build_train_transform(28, crop_scale=(0.4, 1.0))
    a = transform(image, sample_generator(0, 0, 5))
    b = transform(image, sample_generator(0, 0, 5))
    c = transform(image, sample_generator(0, 1, 5))
    assert a.shape == (3, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    outs = torch.stack([transform(image, sample_generator(1, 0, p)) for p in range(64)])
    assert outs.mean().abs() < 1.5 and outs.std() > 0.2  # ImageNet-normalised range


def test_val_transform_resizes_and_centre_crops() -> None:
    image = decode_image(_jpeg(70, 100))
    out = build_val_transform(42)(image)
    assert out.shape == (3, 42, 42) and out.dtype == torch.float32
    assert torch.equal(out, build_val_transform(42)(image))


def _jpeg(height: int, width: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


# --- loader -----------------------------------------------------------------------------------


def test_loader_yields_contracted_batches_with_two_workers(demo: tuple[Path, list[dict[str, Any]]], private_tmp: Path) -> None:
    root, mixture = demo
    loader = train_loader(DataCfg(str(root), mixture), image_size=28, batch_size=6, seed=0)
    batches = batches_of(loader)
    assert len(batches) == 20  # 3 × 40 samples / 6
    names = {m["name"] for m in mixture}
    for batch in batches:
        assert list(batch) == ["images", "dataset", "index", "corrupt", "corrupt_shards"]
        assert batch["images"].shape == (6, 3, 28, 28) and batch["images"].dtype == torch.float32
        assert set(batch["dataset"]) == names and Counter(batch["dataset"]).most_common(1)[0][1] == 2
        assert batch["index"].dtype == torch.int64 and batch["index"].shape == (6,)
        assert batch["corrupt"] == 0
    seen = Counter((d, int(i)) for b in batches for d, i in zip(b["dataset"], b["index"]))
    assert len(seen) == 120 and set(seen.values()) == {1}  # every sample exactly once per epoch
    assert list(private_tmp.glob("*_filelock"))  # Streaming's lock files stayed in this test's dir


def test_teacher_domain_composition_of_every_batch(uneven: tuple[Path, list[dict[str, Any]]]) -> None:
    root, mixture = uneven
    resolved = resolve_mixture(mixture, "teacher_domains", str(root))
    loader = train_loader(DataCfg(str(root), mixture), image_size=16, batch_size=10, seed=1, epoch_size=600)
    batches = batches_of(loader)
    assert len(batches) == 60
    per_dataset: Counter[str] = Counter()
    for i, batch in enumerate(batches):
        domains = Counter(resolved.domain_of(name) for name in batch["dataset"])
        expected = [3, 3, 3]
        expected[i % 3] = 4  # 10 split in thirds, the extra sample rotating
        assert [domains[d] for d in resolved.domains] == expected
        per_dataset.update(batch["dataset"])
    # Inside dino2, datasets follow their sizes (120:60) over the epoch.
    assert per_dataset["web_a"] == pytest.approx(2 * per_dataset["web_b"], rel=0.05)
    # Small domains are repeated to keep their third: people (45 images) shows up 200 times.
    assert per_dataset["people"] == 200


def test_grouped_batches_on_several_ranks(uneven: tuple[Path, list[dict[str, Any]]]) -> None:
    """Every rank's batch holds each domain's third ±1; the global batches ignore the world shape."""
    root, mixture = uneven
    loader = train_loader(DataCfg(str(root), mixture), image_size=16, batch_size=6, seed=2, epoch_size=480)
    dataset = loader.dataset
    dataset.num_canonical_nodes, dataset.shuffle_block_size = 2, 1 << 18
    domain = np.array([dataset.mixture.domain_of(dataset.mixture.streams[s].name) for s in dataset.stream_per_shard])
    shard_of = np.array([dataset.spanner[i][0] for i in range(dataset.num_samples)])

    def global_rows(nodes: int, ranks: int, workers: int, batch: int, resume: int = 0) -> list[list[int]]:
        dataset.batch_size = batch
        work = generate_work_grouped(dataset, World(nodes, ranks, workers, 0), 0, resume)
        total = nodes * ranks
        rows: dict[int, list[tuple[int, int]]] = {}
        for n in range(nodes):
            for r in range(ranks):
                for w in range(workers):
                    ids = work[n, r, w].reshape(-1)
                    world = World(nodes, ranks, workers, (n * ranks + r) * workers + w)
                    positions = worker_positions(world, batch, resume, len(ids))
                    for per_rank in ids.reshape(-1, batch):
                        if per_rank[0] < 0:
                            continue
                        counts = Counter(domain[shard_of[per_rank]])
                        for d, share in (("dino2", 1 / 3), ("mast3r", 1 / 3), ("multihmr", 1 / 3)):
                            assert abs(counts[d] - batch * share) < 1 + 1e-9
                    for sample, pos in zip(ids, positions):
                        if sample >= 0:
                            rows.setdefault(int(pos) // (batch * total), []).append((int(pos), int(sample)))
        return [[s for _, s in sorted(row)] for _, row in sorted(rows.items())]

    single = global_rows(1, 1, 1, 12)
    assert global_rows(1, 2, 3, 6) == single
    assert global_rows(2, 2, 2, 3) == single
    assert global_rows(1, 2, 1, 6, resume=36) == single[3:]


RANK_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest_data import DataCfg, train_loader
loader = train_loader(DataCfg({root!r}, {mixture!r}), image_size=16, batch_size=6, seed=5)
batches = [b for b, _ in zip(loader, range(4))]
torch.save({{"dataset": [b["dataset"] for b in batches], "images": torch.stack([b["images"] for b in batches])}}, sys.argv[1])
"""


@pytest.mark.distributed
def test_two_ranks_split_each_global_batch_of_one_rank(uneven: tuple[Path, list[dict[str, Any]]], tmp_path: Path, private_tmp: Path) -> None:
    """Two real rank processes × 6 hold the 1 × 12 global batches, samples and augmentations alike
    (slow only because each process imports torch + Streaming)."""
    root, mixture = uneven
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "rank.py"
    (private_tmp / "ranks").mkdir()  # the two ranks' own lock files and shared-memory coordination
    script.write_text(RANK_SCRIPT.format(tests=str(Path(__file__).parent), root=str(root), mixture=mixture))
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=str(private_tmp / "ranks"))
        out = tmp_path / f"rank{rank}.pt"
        procs.append((subprocess.Popen([sys.executable, str(script), str(out)], env=env), out))
    single = batches_of(train_loader(DataCfg(str(root), mixture), image_size=16, batch_size=12, seed=5), limit=4)
    for proc, _ in procs:
        assert proc.wait(timeout=120) == 0
    for rank, (_, out) in enumerate(procs):
        part = torch.load(out)
        for b in range(4):
            assert part["dataset"][b] == single[b]["dataset"][rank::2]
            assert torch.equal(part["images"][b], single[b]["images"][rank::2])
            domains = Counter(part["dataset"][b])
            assert abs(domains["web_a"] + domains["web_b"] - 2) <= 1 and abs(domains["scenes"] - 2) <= 1


def test_augmentations_do_not_depend_on_worker_count(demo: tuple[Path, list[dict[str, Any]]]) -> None:
    root, mixture = demo
    runs = []
    for workers in (0, 2):
        loader = train_loader(DataCfg(str(root), mixture, num_workers=workers), image_size=20, batch_size=6, seed=7)
        runs.append(batches_of(loader, limit=5))
    for a, b in zip(*runs):
        assert a["dataset"] == b["dataset"] and torch.equal(a["index"], b["index"])
        assert torch.equal(a["images"], b["images"])


def test_state_dict_resumes_mid_epoch_with_the_same_batches(demo: tuple[Path, list[dict[str, Any]]]) -> None:
    root, mixture = demo
    cfg = DataCfg(str(root), mixture)
    first = train_loader(cfg, image_size=20, batch_size=6, seed=3)
    epoch0 = batches_of(first)
    iterator = iter(first)
    head = [next(iterator) for _ in range(4)]  # epoch 1, four batches in
    state = first.state_dict()
    tail = list(iterator)
    assert state["epoch"] == 1 and state["sample_in_epoch"] == 24
    assert [b["index"].tolist() for b in head] != [b["index"].tolist() for b in epoch0[:4]]  # a new order

    resumed = train_loader(cfg, image_size=20, batch_size=6, seed=3)
    resumed.load_state_dict(state)
    again = batches_of(resumed)
    assert len(again) == len(tail) == 16
    for a, b in zip(again, tail):
        assert a["dataset"] == b["dataset"] and torch.equal(a["index"], b["index"])
        assert torch.equal(a["images"], b["images"])
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["sample_in_epoch"]) == (2, 0)  # epoch 1 done
    assert len(batches_of(resumed)) == 20  # iterating again runs epoch 2 from its beginning
    assert resumed.state_dict()["epoch"] == 3


def test_state_saved_at_the_end_of_an_epoch_resumes_with_the_next(demo: tuple[Path, list[dict[str, Any]]]) -> None:
    root, mixture = demo
    cfg = DataCfg(str(root), mixture, num_workers=1)
    first = train_loader(cfg, image_size=20, batch_size=6, seed=4)
    assert len(batches_of(first)) == 20
    state = first.state_dict()
    assert (state["epoch"], state["sample_in_epoch"]) == (1, 0)
    next_epoch = batches_of(first, limit=2)
    resumed = train_loader(cfg, image_size=20, batch_size=6, seed=4)
    resumed.load_state_dict(state)
    for a, b in zip(batches_of(resumed, limit=2), next_epoch):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])


def test_corrupt_samples_are_replaced_the_same_way_every_run(tmp_path: Path) -> None:
    mixture = []
    for seed, (name, domain) in enumerate((("ok_a", "dino2"), ("bad_b", "mast3r"), ("ok_c", "multihmr"))):
        corrupt = (3, 4, 17) if name == "bad_b" else ()
        write_synthetic_dataset(tmp_path, name, 24, image_size=24, seed=seed, shard_size_limit=1 << 13, corrupt=corrupt)
        mixture.append({"name": name, "domain": domain})
    runs = []
    for workers in (2, 1):
        loader = train_loader(DataCfg(str(tmp_path), mixture, num_workers=workers), image_size=16, batch_size=6, seed=0)
        runs.append(batches_of(loader))
    for batches in runs:
        assert sum(b["corrupt"] for b in batches) == 3
        bad = Counter(int(i) for b in batches for d, i in zip(b["dataset"], b["index"]) if d == "bad_b")
        assert not {3, 4, 17} & set(bad)  # replaced by the next good image of the shard ...
        assert bad[5] == 3 and bad[18] == 2  # ... 3, 4 → 5 and 17 → 18
        assert all(bool(b["corrupt_shards"]) == bool(b["corrupt"]) for b in batches)  # ... and the shards named
        assert {s.split("/")[0] for b in batches for s in b["corrupt_shards"]} == {"bad_b"}
    for a, b in zip(*runs):
        assert torch.equal(a["images"], b["images"]) and a["corrupt"] == b["corrupt"]


def test_loader_rejects_a_batch_the_mixture_cannot_split(demo: tuple[Path, list[dict[str, Any]]]) -> None:
    root, mixture = demo
    with pytest.raises(ValueError, match="at least 3"):
        train_loader(DataCfg(str(root), mixture), image_size=16, batch_size=2, seed=0)
    with pytest.raises(FileNotFoundError, match="no MDS index"):
        train_loader(DataCfg(str(root), [{"name": "missing", "domain": "dino2"}]), image_size=16, batch_size=2, seed=0)


# --- fidelity to the official DUNE data code (issue 15) ------------------------------------------

# Validation sizes of naver/dune's dataset tables (data/{dino2,mast3r,multihmr}.py); None: no split.
OFFICIAL_VAL_SIZES = {
    "in19k": None, "gldv2": 117_577, "mapillarystreet": 23_943,
    "ARKitScenesV2": 5_307, "BlendedMVS": 5_094, "Co3d_v3": 5_000, "DL3DV": 5_000, "Habitat512": 5_035,
    "MegaDepthDense": 3_682, "Niantic": 4_600, "ScanNetppV2": 5_031, "TartanAir": 10_000, "Unreal4K": 1_988,
    "VirtualKitti": 300, "WildRgb": 5_000,
    "bedlam": 31_381, "agora": 1_225, "cuffs": None, "ubody": 2_016,
}


def test_validation_sizes_are_the_official_ones() -> None:
    mixture = resolve_mixture("teacher_balanced", "teacher_domains", "s3://bucket/shards")
    assert {s.name: s.val_size for s in mixture.streams} == OFFICIAL_VAL_SIZES
    assert resolve_mixture("in1k", "teacher_domains", "s3://b/s").streams[0].val_size == 50_000


def test_val_transform_is_the_official_resize_and_centre_crop() -> None:
    """naver/dune's test transform: shorter side resized to the crop size itself, then centre crop."""
    import torchvision.transforms.v2 as T

    image = decode_image(_jpeg(70, 100))
    official = T.Compose([
        T.Resize(42, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(42),
        T.ToDtype(torch.float32, scale=True), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    torch.testing.assert_close(build_val_transform(42)(image), official(image), atol=1e-6, rtol=0)


def test_val_loader_reads_each_sample_once_the_same_way_every_time(tmp_path: Path) -> None:
    mixture = write_demo_shards(tmp_path, num_samples_per_dataset=24, image_size=40, val_samples_per_dataset=19)
    cfg = DataCfg(str(tmp_path), mixture)
    assert resolved(cfg).validation_names == tuple(m["name"] for m in mixture)
    assert resolved(DataCfg(str(tmp_path), [{k: v for k, v in m.items() if k != "val_size"} for m in mixture])).validation_names == ()
    loader = val_loader(cfg, "synth_mast3r", image_size=28, batch_size=8)
    batches = batches_of(loader)
    assert [len(b["index"]) for b in batches] == [8, 8, 3]  # the short last batch is kept
    assert list(batches[0]) == ["images", "dataset", "index", "corrupt", "corrupt_shards"]
    assert sorted(int(i) for b in batches for i in b["index"]) == list(range(19))
    assert {d for b in batches for d in b["dataset"]} == {"synth_mast3r"}
    stored = StreamingDataset(local=str(tmp_path / "synth_mast3r" / "val"), batch_size=1)[5]
    expected = build_val_transform(28)(decode_image(stored["image"]))
    position = [int(i) for b in batches for i in b["index"]].index(5)
    assert torch.equal(torch.cat([b["images"] for b in batches])[position], expected)
    again = batches_of(val_loader(cfg, "synth_mast3r", image_size=28, batch_size=8, num_workers=0))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(batches, again))
    subset = [batches_of(val_loader(cfg, "synth_mast3r", image_size=28, batch_size=4, max_samples=6)) for _ in range(2)]
    assert [b["index"].tolist() for b in subset[0]] == [b["index"].tolist() for b in subset[1]]
    assert sum(len(b["index"]) for b in subset[0]) == 6
    with pytest.raises(MixtureError, match="not in the mixture"):
        val_loader(cfg, "in19k", image_size=28, batch_size=8)


def test_val_work_on_several_ranks_covers_each_sample_once(tmp_path: Path) -> None:
    """The validation split dealt to 3 ranks × 2 workers: every sample exactly once, padding skipped."""
    mixture = write_demo_shards(tmp_path, num_samples_per_dataset=8, image_size=24, val_samples_per_dataset=23)
    dataset = val_loader(DataCfg(str(tmp_path), mixture), "synth_dino2", image_size=16, batch_size=4).dataset
    dataset.num_canonical_nodes = 1  # set by Streaming when iteration starts
    work = generate_work_grouped(dataset, World(1, 3, 2, 0), 0, 0)
    ids = work[work >= 0]
    assert sorted(ids.tolist()) == list(range(23))
    per_rank = [(work[0, r] >= 0).sum() for r in range(3)]
    assert max(per_rank) - min(per_rank) <= 4  # the short last global batch is spread over the ranks


def _save(path: Path, height: int, width: int, seed: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_png_is_stored_losslessly_and_shards_with_a_jpeg_column_still_read(tmp_path: Path) -> None:
    from PIL import Image
    from streaming import MDSWriter

    from dune_scale.data.convert import convert_dataset
    from dune_scale.data.transforms import decode_stored_image

    png, jpg = _save(tmp_path / "src" / "a.png", 20, 30), _save(tmp_path / "src" / "b.jpg", 20, 30, seed=1)
    report = convert_dataset(str(tmp_path / "src"), str(tmp_path / "mds"), "people", workers=1, progress=False)
    assert report.written == 2 and report.reencoded == 0
    stored = StreamingDataset(local=str(tmp_path / "mds" / "people"), batch_size=1)
    assert [(s["format"], s["image"]) for s in (stored[0], stored[1])] == [("png", png.read_bytes()), ("jpeg", jpg.read_bytes())]
    assert torch.equal(decode_stored_image(stored[0]), torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1))
    lossy = convert_dataset(str(tmp_path / "src"), str(tmp_path / "lossy"), "people", workers=1, quality=90, progress=False)
    assert lossy.reencoded == 1
    assert StreamingDataset(local=str(tmp_path / "lossy" / "people"), batch_size=1)[0]["format"] == "jpeg"
    # A shard written before formats were kept: a `jpeg` column and nothing else.
    old = tmp_path / "old"
    for name in ("web", "scenes", "people"):
        with MDSWriter(out=str(old / name), columns={"jpeg": "bytes", "dataset": "str", "index": "int"}) as writer:
            for i in range(6):
                writer.write({"jpeg": jpg.read_bytes(), "dataset": name, "index": i})
    mix = [{"name": "web", "domain": "dino2"}, {"name": "scenes", "domain": "mast3r"}, {"name": "people", "domain": "multihmr"}]
    batches = batches_of(train_loader(DataCfg(str(old), mix, num_workers=0), image_size=16, batch_size=6, seed=0))
    assert len(batches) == 3 and all(b["corrupt"] == 0 for b in batches)


def test_bedlam_closeup_images_are_rotated_like_the_official_loader(tmp_path: Path) -> None:
    from PIL import Image

    from dune_scale.data.convert import convert_dataset
    from dune_scale.data.transforms import decode_stored_image

    closeup = _save(tmp_path / "src" / "seq_closeup" / "f0.png", 24, 40)
    plain = _save(tmp_path / "src" / "seq_orbit" / "f0.png", 24, 40, seed=1)
    for name, rotated in (("bedlam", 1), ("agora", 0)):
        report = convert_dataset(str(tmp_path / "src"), str(tmp_path / "mds"), name, workers=1, progress=False)
        assert report.rotated == rotated
    stored = StreamingDataset(local=str(tmp_path / "mds" / "bedlam"), batch_size=1)
    assert [stored[i]["rotate"] for i in range(2)] == [-90, 0]
    official = Image.open(closeup).convert("RGB").rotate(-90)  # naver/dune data/multihmr.py
    assert torch.equal(decode_stored_image(stored[0]), torch.from_numpy(np.array(official)).permute(2, 0, 1))
    assert torch.equal(decode_stored_image(stored[1]), decode_image(plain.read_bytes()))


def test_oversized_images_are_downscaled_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dune_scale.cli.convert_data import main
    from dune_scale.data.convert import REPORT_NAME

    _save(tmp_path / "src" / "big.jpg", 150, 200)
    _save(tmp_path / "src" / "big.png", 150, 200, seed=1)
    _save(tmp_path / "src" / "small.png", 40, 50, seed=2)
    out = tmp_path / "mds"
    assert main([str(tmp_path / "src"), str(out), "--name", "web", "--max-pixels", "10000", "--workers", "1", "--no-progress"]) == 0
    assert "2 downscaled" in capsys.readouterr().out
    report = json.loads((out / "web" / REPORT_NAME).read_text())
    assert [(Path(d["path"]).name, d["from"]) for d in report["downscaled"]] == [("big.jpg", [200, 150]), ("big.png", [200, 150])]
    stored = StreamingDataset(local=str(out / "web"), batch_size=1)
    for i, fmt in enumerate(("jpeg", "png", "png")):
        image = decode_image(stored[i]["image"])
        assert stored[i]["format"] == fmt and image.shape[1] * image.shape[2] <= 10_000
    assert decode_image(stored[0]["image"]).shape[1:] == (86, 115)  # aspect kept
    assert main([str(tmp_path / "nothing"), str(out), "--name", "web", "--no-progress"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_val_split_is_written_under_the_dataset_folder(tmp_path: Path) -> None:
    from dune_scale.data.convert import convert_dataset

    _save(tmp_path / "train" / "a.jpg", 20, 20)
    for i in range(3):
        _save(tmp_path / "val" / f"{i}.jpg", 20, 20, seed=i)
    convert_dataset(str(tmp_path / "train"), str(tmp_path / "mds"), "web", workers=1, progress=False)
    report = convert_dataset(str(tmp_path / "val"), str(tmp_path / "mds"), "web", split="val", workers=1, progress=False)
    assert report.output == f"{tmp_path / 'mds'}/web/val" and report.written == 3
    assert StreamingDataset(local=str(tmp_path / "mds" / "web"), batch_size=1).num_samples == 1
    assert StreamingDataset(local=str(tmp_path / "mds" / "web" / "val"), batch_size=1).num_samples == 3


# --- failing loudly (issue 17): damaged data, stop signals, workers on ------------------------------


def _damaged_copy(demo_root: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(demo_root, root)
    _damage(root / "synth_mast3r" / "shard.00000.mds", how)
    return root


def _damage(shard: Path, how: str) -> None:
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:300])
    else:
        shard.unlink()


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_damaged_local_shard_is_named_before_training(demo: tuple[Path, list[dict[str, Any]]], tmp_path: Path, how: str) -> None:
    from dune_scale.data import DataError

    root, mixture = demo
    damaged = _damaged_copy(root, tmp_path, how)
    cause = "bytes where index.json says" if how == "truncated" else "the file is missing"
    with pytest.raises(DataError, match=f"dataset synth_mast3r, shard {damaged}/synth_mast3r/shard.00000.mds: .*{cause}"):
        train_loader(DataCfg(str(damaged), mixture), image_size=16, batch_size=6, seed=0)


def test_missing_data_root_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import TINY_CPU, tiny_overrides
    from dune_scale.cli.train import main

    missing = tmp_path / "no_such_folder"
    assert main(["--config", str(TINY_CPU), *tiny_overrides(tmp_path / "run", missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: data.remote_root={str(missing)!r} is not a folder: it must hold one MDS folder per dataset (or be an s3:// or gs:// URL)\n"


def test_s3_endpoint_that_never_answers_is_bounded_by_its_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An endpoint that accepts connections and then says nothing: the loader's access check gives up
    after data.download_timeout and the converter after --timeout (one attempt each), not after
    botocore's minutes of retries."""
    import time

    from dune_scale.cli.convert_data import main as convert_main
    from dune_scale.data import DataError
    from dune_scale.data.remote import check_access

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    _save(tmp_path / "src" / "a.jpg", 20, 20)
    with socket.create_server(("127.0.0.1", 0)) as server:
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(DataError, match=rf"dataset web: no answer from the object store .* within data.download_timeout=1 s \(endpoint {endpoint}\)"):
            check_access("s3://bucket/shards", ["web"], endpoint, timeout=1.0)
        args = [str(tmp_path / "src"), "s3://bucket/shards", "--name", "web", "--timeout", "1", "--no-progress"]
        assert convert_main([*args, "--s3-endpoint-url", endpoint]) == 2
        assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert err.startswith("error: s3://bucket/shards/web: no answer from the object store within 1 s") and err.count("\n") == 1


def _start_training(tmp_path: Path, shards: Path, *overrides: str) -> subprocess.Popen:
    """tiny_cpu with 2 loader workers in its own session (so a test can signal the whole group)."""
    from conftest import REPO, TINY_CPU, tiny_overrides

    args = tiny_overrides(tmp_path / "run", shards, "data.num_workers=2", "train.total_steps=400", *overrides)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY_CPU), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _wait_for_step(run: Path, process: subprocess.Popen, step: int, timeout: float = 120) -> None:
    import time

    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= step):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not reach its first steps"
        time.sleep(0.1)


def _processes_of(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (the run's unique folder): the run and its workers."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _assert_no_process_left(marker: str) -> None:
    import time

    deadline = time.monotonic() + 10
    while _processes_of(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _processes_of(marker)
    for pid in left:  # clean up before failing: never leave workers behind
        os.kill(pid, 9)
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def long_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo datasets in many small shards (a damaged one is met within a few steps)."""
    from dune_scale.data.synthetic import DEMO_DATASETS

    root = tmp_path_factory.mktemp("long_demo")
    for seed, (name, _) in enumerate(DEMO_DATASETS):
        write_synthetic_dataset(root, name, 96, image_size=48, seed=seed, shard_size_limit=1 << 13)
    return root


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_shard_damaged_while_workers_read_is_named(long_demo: Path, tmp_path: Path, how: str) -> None:
    """After the start-up check: the worker's error reaches the caller naming dataset, shard and cause."""
    import shutil

    from dune_scale.data import DataError

    shards = tmp_path / "shards"
    shutil.copytree(long_demo, shards)
    loader = train_loader(DataCfg(str(shards), "demo"), image_size=16, batch_size=6, seed=0)
    batches = iter(loader)
    next(batches)
    for shard in (shards / "synth_mast3r").glob("shard.*.mds"):
        _damage(shard, how)
    cause = "shorter than its index.json says" if how == "truncated" else "the shard file is missing"
    with pytest.raises(DataError, match=f"^dataset synth_mast3r, shard {shards}/synth_mast3r/shard.*{cause}"):
        for _ in batches:
            pass


@pytest.mark.distributed
def test_shard_damaged_mid_run_ends_the_job_with_workers_on(long_demo: Path, tmp_path: Path) -> None:
    """Workers on: the error ends the run promptly (exit 2, one line naming dataset, shard and cause),
    and no worker outlives it. Before, the workers ignored the loader's SIGTERM and the job hung."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(long_demo, shards)
    process = _start_training(tmp_path, shards, "train.max_steps=400")
    try:
        _wait_for_step(tmp_path / "run", process, 1)
        for shard in (shards / "synth_mast3r").glob("shard.*.mds"):
            _damage(shard, "truncated")
        _, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    assert process.returncode == 2, err[-3000:]
    assert f"error: dataset synth_mast3r, shard {shards}/synth_mast3r/shard." in err
    assert "shorter than its index.json says" in err and "Traceback" not in err
    _assert_no_process_left(str(tmp_path / "run"))


@pytest.mark.distributed
def test_stop_signal_to_every_process_still_saves(long_demo: Path, tmp_path: Path) -> None:
    """SLURM signals every process of a step: workers ignore it, the run saves and exits 75."""
    import signal

    process = _start_training(tmp_path, long_demo, "train.max_steps=400")
    try:
        _wait_for_step(tmp_path / "run", process, 2)
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    assert process.returncode == 75, err[-3000:]
    assert list((tmp_path / "run" / "checkpoints").glob("*/"))
    _assert_no_process_left(str(tmp_path / "run"))


@pytest.mark.distributed
def test_workers_die_with_a_killed_parent(long_demo: Path, tmp_path: Path) -> None:
    from conftest import REPO

    script = (
        "import sys, time; sys.path.insert(0, 'tests'); from conftest_data import DataCfg, train_loader;"
        f"it = iter(train_loader(DataCfg({str(long_demo)!r}, 'demo'), image_size=16, batch_size=6, seed=0));"
        "next(it); print('ready', flush=True); time.sleep(600)"
    )
    marker = str(tmp_path / "parent")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script, marker], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        assert len(_processes_of(marker)) == 3  # the parent and its two workers
        process.kill()
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    _assert_no_process_left(marker)


def test_closing_a_loader_frees_its_shared_memory(demo: tuple[Path, list[dict[str, Any]]]) -> None:
    """Streaming would hold a loader's shared-memory segments (and a file descriptor each) until the
    process exits, and every later loader opens them again: closing one frees them for good."""
    import os

    from dune_scale.data import close_loader

    def segments() -> set[str]:
        """The shared-memory files this process holds open."""
        names = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                names.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # closed meanwhile (e.g. the listing's own descriptor)
                continue
        return {name for name in names if name.startswith("/dev/shm/")}

    root, mixture = demo
    before = segments()
    loader = train_loader(DataCfg(str(root), mixture, num_workers=0), image_size=16, batch_size=6, seed=0)
    batches_of(loader, 2)
    held = segments() - before
    assert any(name.endswith("_locals") for name in held)
    close_loader(loader)
    # Unlinked: later loaders no longer find (and open) them; at most a handle Streaming opened while
    # probing prefixes still points at a deleted file.
    assert not [name for name in held if os.path.exists(name)]


def test_a_full_cache_never_evicts_a_shard_still_ahead_of_the_reader(tmp_path: Path) -> None:
    """Streaming evicts the least recently touched shard: here shard 0, downloaded ahead and not yet
    read, while the reader touched shards 1 and 2 since. Its ready thread would then wait for
    shard 0 forever (the hang a tight ``data.cache_limit`` met); the shard of a sample ahead stays."""
    from types import SimpleNamespace

    from streaming import Stream
    from streaming.base.dataset import _ShardState

    from dune_scale.data.dataset import MixtureDataset

    remote = write_synthetic_dataset(tmp_path, "shapes", 40, image_size=24, seed=0, shard_size_limit=1 << 12)
    mixture = resolve_mixture([{"name": "shapes", "domain": "dino2"}], "proportional", str(tmp_path))
    dataset = MixtureDataset(streams=[Stream(remote=str(remote), local=str(tmp_path / "cache"))], mixture=mixture,
                             transform=build_train_transform(16), batch_size=4, cache_limit="1mb")
    assert dataset.num_shards >= 4
    first_of = np.concatenate([[0], np.cumsum(dataset.samples_per_shard)[:-1]])  # a sample of each shard
    for shard_id in (0, 1, 2):  # downloaded in this order: shard 0 is the least recently touched
        dataset.prepare_shard(shard_id)
    dataset._epoch_iterator = SimpleNamespace(sample_ids=first_of[[2, 0, 3]], yield_index=0, prepare_index=2)
    dataset.evict_coldest_shard()
    states = dataset._shard_states.numpy()
    assert states[0] == _ShardState.LOCAL  # still ahead of the reader: kept
    assert states[1] == _ShardState.REMOTE  # the least recently touched shard no sample ahead needs
    assert (remote / dataset.shards[1].file_pairs[0][0].basename).is_file()  # evicted from the cache only
    dataset.release_shared_memory()


def test_a_shard_that_fails_to_prepare_fails_every_reader_instead_of_blocking_them(long_demo: Path, tmp_path: Path) -> None:
    """Streaming left a failed shard marked "being prepared": the next worker needing it waited
    forever (a shard deleted while two workers read hung the loader). It fails for each of them."""
    import shutil

    from streaming.base.dataset import _ShardState

    from dune_scale.data import DataError

    shards = tmp_path / "shards"
    shutil.copytree(long_demo, shards)
    dataset = train_loader(DataCfg(str(shards), "demo"), image_size=16, batch_size=6, seed=0).dataset
    shard_id = int(np.flatnonzero(dataset.stream_per_shard == 1)[0])  # synth_mast3r's first shard
    (shards / "synth_mast3r" / dataset.shards[shard_id].file_pairs[0][0].basename).unlink()
    for _ in range(2):  # the second reader would wait for the first one's preparation forever
        with pytest.raises(DataError, match="the shard file is missing"):
            dataset.prepare_shard(shard_id)
        assert dataset._shard_states[shard_id] == _ShardState.LOCAL
    dataset.release_shared_memory()
