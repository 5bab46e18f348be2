"""naver/dune's dataset loaders as listing rules: which files each official getter reads, per split.

One small function per official getter (``data/dino2.py``, ``data/imagenet.py``, ``data/mast3r.py``,
``data/multihmr.py``) returns the reader its dataset class amounts to, on the paths a SOURCES file
gives in the terms of the official ``data/paths.py``; ``None`` where the official code has no such
split. Readers list the image files in the official order and count what they leave out, by reason:

* ``ClassFolders`` (``ImageFolderV2``, a torchvision ``ImageFolder``): sorted class folders (hidden
  ones too), each walked as ``sorted(os.walk(followlinks=True))`` with sorted file names; files
  directly in the split folder are no class's and do not count;
* ``OneFolder`` (``ImageOneFolderV2``): the split folder itself as the one class, walked recursively;
* ``PairList`` (``ImageNetSubset``): the ``(path, target)`` list pickled for ImageNet-19k;
* ``CacheList`` (``Mast3rDataset``): ``(root, image list)`` from ``<cache>/<name>_<split>_impaths.pkl``,
  the dataset's own root when the pickled root is not a folder;
* ``AnnotationKeys`` (UBody): the sorted keys of an annotation pickle, under ``<root>/videos``.

A file counts when the getter's ``is_valid_file`` accepts it; without one, torchvision's
(``IMG_EXTENSIONS``, case-insensitive). Pickles are read with the allow-list unpickler (containers,
strings, numbers, numpy arrays; ``dune_scale.safe_load``): one naming anything else is refused, and
nothing in it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS

from dune_scale.safe_load import UnreadableCheckpoint, load_pickle, numpy_globals, plain_globals

# SOURCES keys that are not dataset names (data/paths.py: MAST3R_CACHE_DIR, HMR_DATASET_PATHS["ubody_pkl"]).
MAST3R_CACHE = "mast3r_cache"
UBODY_PKL = "ubody_pkl"
SOURCE_KEYS = {
    MAST3R_CACHE: "the folder of the MASt3R cache pickles <name>_<split>_impaths.pkl (MAST3R_CACHE_DIR)",
    UBODY_PKL: "the folder of ubody_intra_train.pkl and ubody_intra_test.pkl (HMR_DATASET_PATHS['ubody_pkl'])",
}
EXAMPLES_KEPT = 5  # paths kept per reason a file is left out


class LayoutError(ValueError):
    """A dataset's sources do not hold what its official loader reads (the message names the path)."""


@dataclass
class Listing:
    """The files an official loader reads, in its order, and what it leaves out of its folders."""

    files: list[str] = field(default_factory=list)
    root: str = "/"  # the folder rotation patterns are matched below
    excluded: dict[str, int] = field(default_factory=dict)  # reason → files left out
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def exclude(self, reason: str, path: str) -> None:
        self.excluded[reason] = self.excluded.get(reason, 0) + 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(path)


Accept = Callable[[str], "str | None"]  # path → None when the loader reads it, else why it does not


def torchvision_image(path: str) -> str | None:
    """torchvision's default ``is_valid_file``."""
    return None if path.lower().endswith(IMG_EXTENSIONS) else "extension not among torchvision's IMG_EXTENSIONS"


def visible(path: str) -> str | None:
    return "hidden file (name starts with '.')" if os.path.basename(path).startswith(".") else None


def bedlam_png(path: str) -> str | None:
    """data/multihmr.py get_bedlam: ``.png`` (case-sensitive), hidden files skipped."""
    return visible(path) or (None if path.endswith(".png") else "not ending in .png (case-sensitive)")


def _walk(folder: str, accept: Accept, listing: Listing) -> int:
    """Files under ``folder`` in DatasetFolder's order; returns how many were accepted."""
    before = len(listing.files)
    for root, _, names in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(names):
            path = os.path.join(root, name)
            reason = accept(path)
            if reason is None:
                listing.files.append(path)
            else:
                listing.exclude(reason, path)
    return len(listing.files) - before


def _require(path: str, kind: str, what: str) -> None:
    present = os.path.isdir(path) if kind == "folder" else os.path.isfile(path)
    if not present:
        raise LayoutError(f"{what}: {path} is not a {kind}")


def _read_pickle(path: str, what: str) -> Any:
    try:
        return load_pickle(path, {**plain_globals(), **numpy_globals()})
    except UnreadableCheckpoint as err:
        raise LayoutError(f"{what} {path}: {err}") from None


def _strings(items: Any, path: str, what: str) -> list[str]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) and not hasattr(items, "tolist"):
        raise LayoutError(f"{what} {path}: expected a list of image paths, got {type(items).__name__}")
    items = items.tolist() if hasattr(items, "tolist") else list(items)
    wrong = next((item for item in items if not isinstance(item, str)), None)
    if wrong is not None:
        raise LayoutError(f"{what} {path}: expected image paths (strings), found {wrong!r}")
    return items


# ---------------------------------------------------------------------------------------------
# Readers: what each official dataset class reads


@dataclass(frozen=True)
class ClassFolders:
    """``ImageFolderV2(folder, is_valid_file=accept)``."""

    folder: str
    accept: Accept = torchvision_image

    def inputs(self) -> list[tuple[str, str]]:
        return [(self.folder, "folder")]

    def describe(self) -> str:
        return f"class folders of {self.folder} ({self.accept.__name__})"

    def list(self) -> Listing:
        listing = Listing(root=self.folder)
        classes = []
        for entry in sorted(os.scandir(self.folder), key=lambda e: e.name):
            if entry.is_dir():
                classes.append(entry.name)
            else:
                listing.exclude("directly in the split folder, not in a class folder", entry.path)
        empty = [c for c in classes if _walk(os.path.join(self.folder, c), self.accept, listing) == 0]
        if not classes:
            listing.notes.append(f"{self.folder} has no class folder: the official ImageFolder refuses it")
        elif empty:
            listing.notes.append(
                f"{len(empty)} class folder(s) without a file it reads ({', '.join(empty[:EXAMPLES_KEPT])}): "
                "the official ImageFolder refuses such a split"
            )
        return listing


@dataclass(frozen=True)
class OneFolder:
    """``ImageOneFolderV2(folder, is_valid_file=accept)``: every file below ``folder``, recursively."""

    folder: str
    accept: Accept = torchvision_image

    def inputs(self) -> list[tuple[str, str]]:
        return [(self.folder, "folder")]

    def describe(self) -> str:
        return f"every file below {self.folder} ({self.accept.__name__})"

    def list(self) -> Listing:
        listing = Listing(root=self.folder)
        _walk(os.path.join(self.folder, ""), self.accept, listing)
        return listing


@dataclass(frozen=True)
class PairList:
    """``ImageNetSubset(pickle)``: a pickled list of ``(image path, target)``."""

    pickle: str

    def inputs(self) -> list[tuple[str, str]]:
        return [(self.pickle, "file")]

    def describe(self) -> str:
        return f"the (path, target) list in {self.pickle}"

    def list(self) -> Listing:
        what = "the ImageNet-19k image list"
        samples = _read_pickle(self.pickle, what)
        if not isinstance(samples, (list, tuple)):
            raise LayoutError(f"{what} {self.pickle}: expected a list of (path, target) pairs, got {type(samples).__name__}")
        wrong = next((s for s in samples if not isinstance(s, (list, tuple)) or len(s) != 2), None)
        if wrong is not None:
            raise LayoutError(f"{what} {self.pickle}: expected (path, target) pairs, found {wrong!r}")
        return Listing(files=_strings([path for path, _ in samples], self.pickle, what))


@dataclass(frozen=True)
class CacheList:
    """``Mast3rDataset``: ``(root, image list)`` from the cache pickle; ``fallback`` when root is not a folder."""

    pickle: str
    fallback: str
    name: str

    def inputs(self) -> list[tuple[str, str]]:
        return [(self.pickle, "file")]

    def describe(self) -> str:
        return f"the (root, images) of {self.pickle}, else under {self.fallback or '(none)'}"

    def list(self) -> Listing:
        what = f"the MASt3R cache of {self.name}"
        content = _read_pickle(self.pickle, what)
        if not isinstance(content, (list, tuple)) or len(content) != 2 or not isinstance(content[0], str):
            raise LayoutError(f"{what} {self.pickle}: expected a pair (root folder, list of images), got {type(content).__name__}")
        root, images = content[0], _strings(content[1], self.pickle, what)
        listing = Listing(root=root)
        if not os.path.isdir(root):
            if not self.fallback or not os.path.isdir(self.fallback):
                raise LayoutError(
                    f"{what}: the root {root!r} in {self.pickle} is not a folder, and SOURCES gives no folder "
                    f"for {self.name} to read the images from instead (got {self.fallback!r})"
                )
            listing.notes.append(f"the cache's root {root} is not a folder: images read under {self.fallback}")
            listing.root = root = self.fallback
        listing.files = [os.path.join(root, image) for image in images]
        return listing


@dataclass(frozen=True)
class AnnotationKeys:
    """``ImageListV2(image_root, sorted(annotations))``: the images an annotation pickle is keyed by."""

    pickle: str
    image_root: str

    def inputs(self) -> list[tuple[str, str]]:
        return [(self.pickle, "file"), (self.image_root, "folder")]

    def describe(self) -> str:
        return f"the keys of {self.pickle}, under {self.image_root}"

    def list(self) -> Listing:
        what = "the annotations"
        annotations = _read_pickle(self.pickle, what)
        if not isinstance(annotations, dict):
            raise LayoutError(f"{what} {self.pickle}: expected a dict keyed by image path, got {type(annotations).__name__}")
        keys = _strings(list(annotations), self.pickle, what)
        return Listing(files=[os.path.join(self.image_root, key) for key in sorted(keys)], root=self.image_root)


Reader = ClassFolders | OneFolder | PairList | CacheList | AnnotationKeys


# ---------------------------------------------------------------------------------------------
# The official getters. ``sources`` maps SOURCES keys to paths; ``split`` is "train" or "val".


def in1k(sources: Mapping[str, Any], name: str, split: str) -> Reader:
    """data/imagenet.py get_imagenet: ImageFolderV2 on ``<first existing of IN1K_DIRS>/<split>``."""
    dirs = [sources[name]] if isinstance(sources[name], str) else list(sources[name])
    root = next((d for d in dirs if os.path.isdir(d)), dirs[0])
    return ClassFolders(os.path.join(root, split))


def in19k(sources: Mapping[str, Any], name: str, split: str) -> Reader | None:
    """data/imagenet.py get_imagenet: ImageNetSubset(IN19K_PKL_PATH); no validation split."""
    return PairList(sources[name]) if split == "train" else None


def gldv2(sources: Mapping[str, Any], name: str, split: str) -> Reader:
    """data/dino2.py get_gldv2: class folders of ``train/`` or ``test/``."""
    return ClassFolders(os.path.join(sources[name], "train" if split == "train" else "test"))


def mapillarystreet(sources: Mapping[str, Any], name: str, split: str) -> Reader:
    """data/dino2.py get_mapillarystreet: everything below ``train_val/`` or ``test/``."""
    return OneFolder(os.path.join(sources[name], "train_val" if split == "train" else "test"))


def mast3r(sources: Mapping[str, Any], name: str, split: str) -> Reader:
    """data/mast3r.py Mast3rDataset: ``<MAST3R_CACHE_DIR>/<name>_<split>_impaths.pkl``."""
    return CacheList(os.path.join(sources[MAST3R_CACHE], f"{name}_{split}_impaths.pkl"), sources.get(name) or "", name)


def bedlam(sources: Mapping[str, Any], name: str, split: str) -> Reader:
    """data/multihmr.py get_bedlam: class folders of ``training/`` or ``validation/``, ``.png`` only."""
    return ClassFolders(os.path.join(sources[name], "training" if split == "train" else "validation"), bedlam_png)


def agora(sources: Mapping[str, Any], name: str, split: str) -> Reader:
    """data/multihmr.py get_agora: every non-hidden file below ``train/`` or ``validation/``."""
    return OneFolder(os.path.join(sources[name], "train" if split == "train" else "validation"), visible)


def cuffs(sources: Mapping[str, Any], name: str, split: str) -> Reader | None:
    """data/multihmr.py get_cuffs: everything below the dataset root; no validation split."""
    return OneFolder(sources[name]) if split == "train" else None


def ubody(sources: Mapping[str, Any], name: str, split: str) -> Reader:
    """data/multihmr.py get_ubody: the keys of ``ubody_intra_{train,test}.pkl`` under ``<root>/videos``."""
    pickle = os.path.join(sources[UBODY_PKL], f"ubody_intra_{'train' if split == 'train' else 'test'}.pkl")
    return AnnotationKeys(pickle, os.path.join(sources[name], "videos"))


MAST3R_DATASETS = (
    "ARKitScenesV2", "BlendedMVS", "Co3d_v3", "DL3DV", "Habitat512", "MegaDepthDense", "Niantic",
    "ScanNetppV2", "TartanAir", "Unreal4K", "VirtualKitti", "WildRgb",
)  # fmt: skip
OFFICIAL_GETTERS: dict[str, Callable[[Mapping[str, Any], str, str], Reader | None]] = {
    "in1k": in1k, "in19k": in19k, "gldv2": gldv2, "mapillarystreet": mapillarystreet,
    **{name: mast3r for name in MAST3R_DATASETS},
    "bedlam": bedlam, "agora": agora, "cuffs": cuffs, "ubody": ubody,
}  # fmt: skip
# What the SOURCES value of each dataset name is, as data/paths.py says.
DATASET_VALUE = {
    "in1k": "its folder, or a list of folders of which the first that exists is used (IN1K_DIRS)",
    "in19k": "the pickled (path, target) list (IN19K_PKL_PATH)",
    **{name: "its root, used when its cache pickle's root is not a folder ('' for none)" for name in MAST3R_DATASETS},
    "agora": "its images folder (holding train/ and validation/)",
}


def reader_for(sources: Mapping[str, Any], name: str, split: str) -> Reader | None:
    """The reader of ``name``'s ``split`` (None: the official code has no such split); a SOURCES key
    it needs and lacks is named."""
    try:
        return OFFICIAL_GETTERS[name](sources, name, split)
    except KeyError as err:
        key = err.args[0]
        raise LayoutError(f"{name} needs {key!r} in SOURCES: {SOURCE_KEYS.get(key, DATASET_VALUE.get(key, 'its root'))}") from None


def check_inputs(reader: Reader, name: str, split: str) -> None:
    """The folders and files the reader opens are there."""
    for path, kind in reader.inputs():
        _require(path, kind, f"{name} ({split})")
