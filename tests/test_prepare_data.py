"""Preparing the mixture (issue 29): a miniature of every official naver/dune layout, with the files
its loaders leave out, → prepare_data; parts + merge == one run; a killed run resumes to the same
shards; pickles holding anything but containers, strings, numbers and numpy arrays are refused."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from streaming.base.format import reader_from_json

from dune_scale.cli.prepare_data import main
from dune_scale.data.official_layouts import MAST3R_DATASETS, reader_for
from dune_scale.data.prepare import REPORT, load_sources

REPO = Path(__file__).resolve().parents[1]
FALLBACK = "Habitat512"  # its cache pickle names a root that is not a folder: read under its SOURCES root
AS_ARRAY = "Co3d_v3"  # its cache pickle holds the image list as a numpy array of strings


def _image(path: Path, seed: int, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix.lower() == ".png" else None)
    return path


def _text(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not an image")


def _pickle(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def build_miniature(src: Path) -> tuple[Path, dict[tuple[str, str], dict[str, Any]]]:
    """Every official layout in miniature; returns SOURCES.yaml and, per (dataset, split), what the
    official loader finds, what gets written and the reasons files are skipped or left out."""
    seed = iter(range(10_000))
    expected: dict[tuple[str, str], dict[str, Any]] = {}

    def images(*paths: str) -> list[Path]:
        return [_image(src / p, next(seed)) for p in paths]

    # in19k: the (path, target) list; one listed file is gone (skipped at conversion, like a bad file).
    listed = images("in19k/n01/a.jpg", "in19k/n01/b.jpg", "in19k/n02/c.jpg")
    _pickle(src / "in19k_images.pkl", [(str(p), np.int64(i)) for i, p in enumerate(listed)] + [(str(src / "in19k/n02/gone.jpg"), 3)])
    expected["in19k", "train"] = {"found": 4, "written": 3, "skipped": {"FileNotFoundError": 1}}
    # gldv2: class folders of train/ (a hidden class folder counts, a file directly in train/ does not).
    images("gldv2/train/c1/a.jpg", "gldv2/train/c1/sub/b.JPG", "gldv2/train/c2/c.png", "gldv2/train/.c3/d.jpg", "gldv2/train/loose.jpg")
    _text(src / "gldv2/train/c2/notes.txt")
    images("gldv2/test/c1/e.jpg", "gldv2/test/c2/f.jpg")
    expected["gldv2", "train"] = {"found": 4, "left_out": {"directly in the split folder, not in a class folder": 1,
                                                           "extension not among torchvision's IMG_EXTENSIONS": 1}}
    expected["gldv2", "val"] = {"found": 2}
    # mapillarystreet: everything below train_val/ and test/, recursively (hidden files too: no filter but the extension).
    images("mapillary/train_val/x.jpg", "mapillary/train_val/city/y.jpeg", "mapillary/train_val/city/deep/z.webp",
           "mapillary/train_val/.h.jpg", "mapillary/test/t.jpg")  # fmt: skip
    _text(src / "mapillary/train_val/readme.md")
    expected["mapillarystreet", "train"] = {"found": 4, "left_out": {"extension not among torchvision's IMG_EXTENSIONS": 1}}
    expected["mapillarystreet", "val"] = {"found": 1}
    # MASt3R: (root, image list) cache pickles; one with a root that is not a folder.
    for name in MAST3R_DATASETS:
        for split, count in (("train", 2), ("val", 1)):
            relative = [f"seq/{split}_{i}.jpg" for i in range(count)]
            images(*(f"mast3r/{name}/{r}" for r in relative))
            root = "/nonexistent/moved/dataset" if name == FALLBACK else str(src / "mast3r" / name)
            _pickle(src / "mast3r_cache" / f"{name}_{split}_impaths.pkl", (root, np.array(relative) if name == AS_ARRAY else relative))
            expected[name, split] = {"found": count}
    # bedlam: class folders of training/, .png only (case-sensitive), hidden files skipped; closeups rotated.
    images("bedlam/training/seq_closeup/f0.png", "bedlam/training/seq_orbit/f0.png", "bedlam/training/seq_orbit/f1.jpg",
           "bedlam/training/seq_orbit/f2.PNG", "bedlam/training/seq_orbit/.f3.png", "bedlam/training/loose.png",
           "bedlam/validation/seq/v0.png")  # fmt: skip
    expected["bedlam", "train"] = {"found": 2, "left_out": {"directly in the split folder, not in a class folder": 1,
                                                            "not ending in .png (case-sensitive)": 2, "hidden file (name starts with '.')": 1}}
    expected["bedlam", "val"] = {"found": 1}
    # agora: every non-hidden file below train/ (a text file counts, then fails to decode).
    images("agora/train/a.png", "agora/train/sub/b.jpg", "agora/train/.hidden.png", "agora/validation/v.png")
    _text(src / "agora/train/notes.txt")
    expected["agora", "train"] = {"found": 3, "written": 2, "skipped": {"not an image file PIL can read": 1},
                                  "left_out": {"hidden file (name starts with '.')": 1}}
    expected["agora", "val"] = {"found": 1}
    # cuffs: everything below its root, symbolic links to folders followed; no validation split.
    images("cuffs/a.jpg", "cuffs/s/b.jpg")
    _text(src / "cuffs/c.txt")
    (src / "cuffs/linked").symlink_to(src / "gldv2/test/c1", target_is_directory=True)
    expected["cuffs", "train"] = {"found": 3, "left_out": {"extension not among torchvision's IMG_EXTENSIONS": 1}}
    # ubody: the sorted keys of its annotation pickles (numpy arrays inside), under videos/.
    images("ubody/videos/clip1/0.jpg", "ubody/videos/clip1/1.jpg", "ubody/videos/clip2/0.jpg", "ubody/videos/unlisted.jpg")
    box = np.arange(4, dtype=np.float32)
    _pickle(src / "ubody_annot/ubody_intra_train.pkl", {"clip2/0.jpg": {"bbox": box}, "clip1/0.jpg": {"bbox": box * 2}})
    _pickle(src / "ubody_annot/ubody_intra_test.pkl", {"clip1/1.jpg": {"bbox": box}})
    expected["ubody", "train"] = {"found": 2}
    expected["ubody", "val"] = {"found": 1}

    sources = {
        "in19k": "in19k_images.pkl", "gldv2": "gldv2", "mapillarystreet": "mapillary", "mast3r_cache": "mast3r_cache",
        **{name: str(src / "mast3r" / name) if name == FALLBACK else "" for name in MAST3R_DATASETS},
        "bedlam": "bedlam", "agora": "agora", "cuffs": "cuffs", "ubody": "ubody", "ubody_pkl": "ubody_annot",
    }  # fmt: skip
    (src / "SOURCES.yaml").write_text(yaml.safe_dump(sources))
    for facts in expected.values():
        facts.setdefault("written", facts["found"])
        facts.setdefault("skipped", {})
        facts.setdefault("left_out", {})
    return src / "SOURCES.yaml", expected


def run(sources: Path, out: Path, *args: str) -> int:
    return main([str(sources), str(out), "--workers", "1", "--no-progress", "--samples-per-shard", "2", *args])


def samples(folder: Path) -> list[dict[str, Any]]:
    """Every sample of an MDS split folder, in index order."""
    index = json.loads((folder / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        reader = reader_from_json(str(folder), None, shard)
        out += [reader.get_item(i) for i in range(shard["samples"])]
    return out


def written_files(out: Path) -> dict[str, bytes]:
    """Shards and indexes under ``out`` (what training reads), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.name == "index.json" or p.suffix == ".mds"}


@pytest.fixture(scope="module")
def miniature(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple[str, str], dict[str, Any]]]:
    return build_miniature(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def one_run(miniature: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The miniature prepared by one run; its console output."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("one_run") / "mds"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert run(miniature[0], out) == 0
    return out, console.getvalue()


# --- the official rules ---------------------------------------------------------------------


def test_folder_listings_are_torchvisions(miniature: tuple[Path, dict], tmp_path: Path) -> None:
    """The folder rules list exactly the samples torchvision's ImageFolder does for the official arguments."""
    from torchvision.datasets import ImageFolder

    class OneFolder(ImageFolder):  # naver/dune ImageOneFolderV2: the folder itself is the one class
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return [""], {"": -1}

    src = miniature[0].parent
    for name in ("in1k", "gldv2"):  # in1k: class folders of <root>/<split>, like gldv2's train/
        for folder, split in (("train", "train"), ("val" if name == "in1k" else "test", "val")):
            if name == "in1k":
                for i, cls in enumerate(("n1", "n2")):
                    _image(src / "in1k" / folder / cls / f"{i}.JPEG", 900 + i)
            sources = {name: str(src / name), "in1k": [str(tmp_path / "absent"), str(src / "in1k")]}
            official = [path for path, _ in ImageFolder(str(src / name / folder)).samples]
            assert reader_for(sources, name, split).list().files == official
    is_bedlam = lambda x: x.endswith(".png") and not os.path.basename(x).startswith(".")  # noqa: E731 - data/multihmr.py
    is_agora = lambda x: not os.path.basename(x).startswith(".")  # noqa: E731
    for name, folder, official in (
        ("bedlam", "bedlam/training", ImageFolder(str(src / "bedlam/training"), is_valid_file=is_bedlam)),
        ("agora", "agora/train", OneFolder(str(src / "agora/train"), is_valid_file=is_agora)),
        ("mapillarystreet", "mapillary/train_val", OneFolder(str(src / "mapillary/train_val"))),
        ("cuffs", "cuffs", OneFolder(str(src / "cuffs"))),
    ):
        sources = {name: str(src / folder.split("/")[0])}
        assert reader_for(sources, name, "train").list().files == [path for path, _ in official.samples], name


def test_prepare_converts_every_official_layout(one_run: tuple[Path, str], miniature: tuple[Path, dict]) -> None:
    out, console = one_run
    _, expected = miniature
    report = json.loads((out / REPORT).read_text())
    got = {(s["dataset"], s["split"]): s for s in report["splits"]}
    assert set(got) == set(expected)  # both splits where the official code has one: no in19k or cuffs val
    assert not (out / "in19k" / "val").exists() and not (out / "cuffs" / "val").exists()
    recipe = {d["name"]: d for d in yaml.safe_load((REPO / "configs/data/teacher_balanced.yaml").read_text())["datasets"]}
    for key, facts in expected.items():
        record = got[key]["preparation"]
        assert got[key]["status"] == "converted", key
        assert {k: record[k] for k in facts} == facts, key
        assert record["flag"].startswith(f"{facts['written']:,} images written where the recipe counts"), key
        assert record["official"] == recipe[key[0]]["size" if key[1] == "train" else "val_size"], key
        folder = out / key[0] / ("val" if key[1] == "val" else "")
        index = json.loads((folder / "index.json").read_text())
        assert index["preparation"] == record and record["settings"]["max_side"] == 0
        stored = samples(folder)
        assert [s["dataset"] for s in stored] == [key[0]] * facts["written"]
    assert report["complete"] and report["missing_from_sources"] == [] and len(report["flags"]) == len(expected)
    # Samples keep their position in the official listing; the closeup frame is rotated at load.
    bedlam = samples(out / "bedlam")
    assert [(s["index"], s["rotate"], s["format"]) for s in bedlam] == [(0, -90, "png"), (1, 0, "png")]
    agora = samples(out / "agora")
    assert [s["index"] for s in agora] == [0, 2]  # sorted walk: train/a.png, train/notes.txt (skipped), train/sub/b.jpg
    assert samples(out / FALLBACK)[0]["image"] == (miniature[0].parent / "mast3r" / FALLBACK / "seq/train_0.jpg").read_bytes()
    ubody = samples(out / "ubody")
    assert ubody[0]["image"] == (miniature[0].parent / "ubody/videos/clip1/0.jpg").read_bytes()
    # The console table: a line per split with the official count, flags by name.
    assert "gldv2            train           4           4        0         2" in console
    assert "4,132,914  converted  DIFFERS" in console
    assert "differs from the recipe: ubody/val: 1 images written where the recipe counts 2,016" in console
    assert f"cache's root /nonexistent/moved/dataset is not a folder: images read under {miniature[0].parent}/mast3r/{FALLBACK}" in console
    assert "images/s" in console and "MB/s" in console


def test_rerun_skips_finished_splits_and_reports_missing_datasets(one_run: tuple[Path, str], miniature: tuple[Path, dict],
                                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out, _ = one_run
    before = written_files(out)
    partial = tmp_path / "SOURCES.yaml"
    partial.write_text(yaml.safe_dump({k: v for k, v in load_sources(str(miniature[0])).items() if k not in ("bedlam", "ubody")}))
    assert run(partial, out) == 0
    console = capsys.readouterr().out
    assert "missing from SOURCES: bedlam, ubody" in console
    report = json.loads((out / REPORT).read_text())
    assert {s["status"] for s in report["splits"]} == {"complete"} and report["missing_from_sources"] == ["bedlam", "ubody"]
    assert report["run"]["images"] == 0 and written_files(out) == before
    # --strict-counts: the miniature is not the recipe's data.
    assert run(partial, out, "--only", "cuffs", "--strict-counts") == 2
    assert "cuffs (train): 3 images written where the recipe counts 54,944" in capsys.readouterr().err


def test_two_parts_and_merge_equal_one_run(one_run: tuple[Path, str], miniature: tuple[Path, dict], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    sources, out = miniature[0], tmp_path / "parts"
    assert run(sources, out, "--part", "0/2") == 0
    assert not (out / "gldv2" / "index.json").exists()  # gldv2 train has chunks 0, 1: part 1/2 owns chunk 1
    assert (out / "agora" / "val" / "index.json").exists()  # a single chunk: part 0/2 had everything
    assert not (out / REPORT).exists() and (out / "prepare_report.part-0-of-2.json").exists()
    assert run(sources, out, "--merge") == 1
    assert "gldv2/train" in capsys.readouterr().err
    assert run(sources, out, "--part", "1/2") == 0  # the last part joins every split
    assert written_files(out) == written_files(one_run[0])
    assert json.loads((out / REPORT).read_text())["complete"]
    for split_index in (out / "gldv2" / "index.json", out / "ubody" / "val" / "index.json"):
        split_index.unlink()
    assert run(sources, out, "--merge") == 0
    assert written_files(out) == written_files(one_run[0])


def test_max_side_downscales_and_is_recorded(miniature: tuple[Path, dict], tmp_path: Path) -> None:
    src = tmp_path / "cuffs"
    _image(src / "wide.jpg", 1, (12, 6))
    _image(src / "small.png", 2, (4, 3))
    (tmp_path / "SOURCES.yaml").write_text(yaml.safe_dump({"cuffs": str(src)}))
    out = tmp_path / "mds"
    assert run(tmp_path / "SOURCES.yaml", out, "--max-side", "8") == 0
    stored = samples(out / "cuffs")
    sizes = [Image.open(__import__("io").BytesIO(s["image"])).size for s in stored]
    assert sizes == [(4, 3), (8, 4)] and [s["format"] for s in stored] == ["png", "jpeg"]
    assert stored[0]["image"] == (src / "small.png").read_bytes()  # within the limit: kept byte for byte
    preparation = json.loads((out / "cuffs" / "index.json").read_text())["preparation"]
    assert preparation["settings"]["max_side"] == 8 and preparation["resized"] == 1
    assert json.loads((out / REPORT).read_text())["settings"]["max_side"] == 8


# --- failures -------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["mast3r_cache/Niantic_val_impaths.pkl", "ubody_annot/ubody_intra_train.pkl", "in19k_images.pkl"])
def test_pickle_with_code_is_refused_and_never_runs(miniature: tuple[Path, dict], tmp_path: Path, which: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import shutil

    src = tmp_path / "src"
    shutil.copytree(miniature[0].parent, src, symlinks=True)
    marker = tmp_path / "payload_ran"
    _pickle(src / which, ("/root", [_Payload(marker)]) if "mast3r" in which else {"a.jpg": _Payload(marker)})
    only = {"mast3r_cache": "Niantic", "ubody_annot": "ubody", "in19k_images.pkl": "in19k"}[which.split("/")[0]]
    assert run(src / "SOURCES.yaml", tmp_path / "mds", "--only", only) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(src / which) in err and "posix.system" in err and "refusing to unpickle" in err
    assert not marker.exists()


@pytest.mark.parametrize("edit, args, message", [
    ({"../gldv2": "gldv2"}, (), "unknown key '../gldv2'"),
    ({"agora": "no_such_folder"}, (), "agora (train): {src}/no_such_folder/train is not a folder"),
    ({"ubody_pkl": None}, (), "ubody needs 'ubody_pkl' in SOURCES"),
    ({}, ("--only", "gldv2,imagenet"), "--only: imagenet not in the mixture teacher_balanced"),
    ({}, ("--part", "2/2"), "--part '2/2': expected I/N with 0 <= I < N"),
    ({}, ("--strict-counts", "--only", "gldv2"), "gldv2 (train): its official loader finds 4 images where the recipe counts 4,132,914"),
])  # fmt: skip
def test_bad_input_is_one_error_before_any_work(miniature: tuple[Path, dict], tmp_path: Path, edit: dict, args: tuple,
                                                message: str, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    src = miniature[0].parent
    sources = {**yaml.safe_load(miniature[0].read_text()), **edit}
    sources = {k: (str(src / v) if isinstance(v, str) and v else v) for k, v in sources.items() if v is not None}
    (tmp_path / "SOURCES.yaml").write_text(yaml.safe_dump(sources))
    assert run(tmp_path / "SOURCES.yaml", tmp_path / "mds", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(src=src) in err
    assert not (tmp_path / "gldv2").exists() and not list((tmp_path / "mds").glob("*/*.mds"))


def test_killed_run_resumes_to_the_same_shards(tmp_path: Path) -> None:
    """SIGKILL while a shard is half written (its next file blocks), after a finished dataset;
    the rerun keeps the finished dataset and shards, and ends with an uninterrupted run's files."""
    src = tmp_path / "src"
    for i in range(3):
        _image(src / "agora" / "train" / f"{i}.png", i)
    _image(src / "agora" / "validation" / "v.png", 9)
    frames = [_image(src / "cuffs" / f"{i:02}.jpg", 10 + i) for i in range(9)]
    (src / "SOURCES.yaml").write_text(yaml.safe_dump({"agora": str(src / "agora"), "cuffs": str(src / "cuffs")}))
    reference = tmp_path / "reference"
    assert run(src / "SOURCES.yaml", reference) == 0

    blocking, content = frames[5], frames[5].read_bytes()
    blocking.unlink()
    os.mkfifo(blocking)  # chunk 2 (files 4, 5) stops at file 5: nobody writes the pipe
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "launch/prepare_data.py"), str(src / "SOURCES.yaml"), str(out),
               "--workers", "1", "--no-progress", "--samples-per-shard", "2"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    markers = out / "cuffs" / ".convert"
    try:
        deadline = time.monotonic() + 120
        while len(list(markers.glob("chunk.*.json"))) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # now blocked on the pipe, in the middle of chunk 2
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    assert sorted(p.name for p in markers.glob("chunk.*.json")) == ["chunk.00000.json", "chunk.00001.json"]
    assert (out / "agora" / "val" / "index.json").exists() and not (out / "cuffs" / "index.json").exists()
    blocking.unlink()
    blocking.write_bytes(content)
    finished = (out / "agora" / "index.json").stat().st_mtime_ns
    assert run(src / "SOURCES.yaml", out) == 0
    assert (out / "agora" / "index.json").stat().st_mtime_ns == finished  # the finished dataset was skipped
    report = json.loads((out / REPORT).read_text())
    assert [(s["dataset"], s["status"], s["reused"]) for s in report["splits"]] == [
        ("agora", "complete", 0), ("agora", "complete", 0), ("cuffs", "converted", 2)]
    assert written_files(out) == written_files(reference)
