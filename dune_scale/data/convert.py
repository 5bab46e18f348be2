"""Images on disk → one MDS folder per dataset (columns of ``schema.MDS_COLUMNS``), local or remote.

Layout: the training split of dataset ``NAME`` goes to ``<root>/NAME``, its validation split
(``--split val``) to ``<root>/NAME/val`` (Streaming's ``split`` subfolder), so a dataset's folder
holds everything about it and training folders written before splits existed stay valid.

The sorted file list is cut into fixed chunks of ``samples_per_shard`` files; chunk ``k`` becomes
``shard.{k:05}.mds`` and, once that shard is stored, a marker ``.convert/chunk.{k:05}.json`` with its
index entry, its sources' digest and the files it skipped. Chunks are independent, so they convert
in parallel processes, and a rerun skips every chunk whose marker matches its sources (resumable).
``index.json`` is written last, from the markers: its presence means the dataset is complete.

JPEG, PNG and WebP files are stored byte for byte with their format (lossless: the official DUNE
loader reads BEDLAM's PNGs as they are); other formats are re-encoded as PNG, or as JPEG when a
``quality`` is given. Images above ``max_pixels`` are downscaled to fit and listed in the report
(decoding a 121-megapixel photo cost each loader worker 1.2 GB and a second per sample, while
training crops end at a few hundred pixels); a ``max_side`` (``prepare_data.py --max-side``) caps
the longer side of every image the same way, counted per chunk. Images the official loader rotates (BEDLAM "closeup"
frames, see ``ROTATIONS``) carry that angle in the ``rotate`` column; the loader applies it. Every
image is fully decoded first: corrupt or unreadable files are skipped and listed in
``convert_report.json``, never abort the conversion. ``index`` is the file's position in the sorted
list (gaps where files were skipped), so it names the same file on every rerun. With
``labels="folders"`` (an ImageFolder source) each sample also holds ``label``: its class folder's
position among the sorted class folders, as torchvision's ``ImageFolder`` numbers them (the k-NN
probe reads such shards).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image, UnidentifiedImageError
from streaming import MDSWriter

from dune_scale.data.remote import check_bucket, downloader, storage_error, uploader
from dune_scale.data.schema import MDS_COLUMNS, MDS_HASHES
from dune_scale.files import atomic_write, is_plain_name
from dune_scale.object_store import MISSING_CODES, error_code, s3_endpoint

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Formats stored byte for byte; anything else is re-encoded.
KEPT_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
# 40 MP: above what usual cameras write (12–33 MP), so real datasets pass untouched, while the
# 121-MP outliers that cost each loader worker 1.2 GB are shrunk; 0 disables the limit.
DEFAULT_MAX_PIXELS = 40_000_000
# Per dataset: (substring of the path under the source root, angle in degrees counter-clockwise) the
# official loader applies (it tests the whole path; under the root is the same for its data layout
# and immune to a root folder that happens to hold the word).
ROTATIONS = {"bedlam": (("closeup", -90),)}
SPLITS = ("train", "val")
LAYOUTS = ("auto", "imagefolder", "folder", "glob", "filelist")
LABELS = ("none", "folders")
MARKER_DIR = ".convert"
REPORT_NAME = "convert_report.json"


@dataclass
class ConvertReport:
    """What a conversion did; written next to the shards as ``convert_report.json``."""

    dataset: str
    output: str
    files: int
    written: int = 0
    reencoded: int = 0
    rotated: int = 0
    shards: int = 0
    chunks_reused: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    downscaled: list[dict[str, Any]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # label i's class folder (labels="folders")

    @classmethod
    def from_markers(cls, dataset: str, output: str, files: int, markers: Sequence[dict[str, Any]], reused: int) -> ConvertReport:
        """The report of a split whose chunks' markers (in chunk order) are all there."""
        return cls(
            dataset=dataset,
            output=output,
            files=files,
            written=sum(m["written"] for m in markers),
            reencoded=sum(m["reencoded"] for m in markers),
            rotated=sum(m["rotated"] for m in markers),
            shards=sum(m["shard"] is not None for m in markers),
            chunks_reused=reused,
            skipped=[s for m in markers for s in m["skipped"]],
            downscaled=[d for m in markers for d in m["downscaled"]],
        )


@dataclass(frozen=True)
class ImagePolicy:
    """How source images become stored bytes (part of each chunk's identity: a change re-converts)."""

    quality: int | None = None  # None: lossless (PNG) re-encoding; else JPEG at this quality
    max_pixels: int = DEFAULT_MAX_PIXELS
    rotations: tuple[tuple[str, int], ...] = ()
    max_side: int = field(default=0, repr=False)  # longer side at most this (0: no limit); see identity()

    def rotation(self, path: str) -> int:
        return next((angle for pattern, angle in self.rotations if pattern in path), 0)

    def identity(self) -> str:
        """What chunk digests hash. ``max_side`` enters only when set, so the markers of conversions
        written before it existed still match."""
        return repr(self) + (f"+max_side={self.max_side}" if self.max_side else "")

    def too_many_pixels(self, size: tuple[int, int]) -> bool:
        return bool(self.max_pixels) and size[0] * size[1] > self.max_pixels

    def stored_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size an image of ``size`` is stored at: within ``max_pixels``, then within ``max_side``."""
        if self.too_many_pixels(size):
            size = _fitting(size, self.max_pixels)
        width, height = size
        if self.max_side and max(width, height) > self.max_side:
            scale = self.max_side / max(width, height)
            if width >= height:
                return self.max_side, max(1, round(height * scale))
            return max(1, round(width * scale)), self.max_side
        return size


@dataclass(frozen=True)
class _Chunk:
    number: int
    items: tuple[tuple[int, str], ...]  # (index in the dataset, file path)
    policy: ImagePolicy = ImagePolicy()
    root: str = "/"  # the source's folder: rotation patterns match paths below it
    classes: tuple[str, ...] = ()  # class folders whose position is the ``label`` column (none: no labels)

    def label(self, path: str) -> int:
        return self.classes.index(Path(os.path.relpath(path, self.root)).parts[0])

    @property
    def digest(self) -> str:
        """Identifies the chunk's inputs: paths, sizes, the image policy and the classes (a change changes it)."""
        h = hashlib.sha1(self.policy.identity().encode() + (repr(self.classes).encode() if self.classes else b""))
        for index, path in self.items:
            h.update(f"{index}\t{path}\t{os.path.getsize(path) if os.path.exists(path) else -1}\n".encode())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Sources


def list_sources(source: str, layout: str = "auto") -> list[str]:
    """The image files of a dataset (absolute paths), sorted so indices are stable across runs.

    * ``imagefolder``: ``source/<class>/.../<image>`` (image extensions only);
    * ``folder``: images directly inside ``source``;
    * ``glob``: a recursive pattern (``root/**/*.jpg``), every matching file;
    * ``filelist``: a text file, one path per line (relative to the list's folder; ``#`` comments).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is unknown; choose one of {' | '.join(LAYOUTS)}")
    if layout == "auto":
        layout = _guess_layout(source)
    root = Path(source)
    if layout == "imagefolder":
        files = [p for d in sorted(root.iterdir()) if d.is_dir() for p in sorted(d.rglob("*")) if _is_image(p)]
    elif layout == "folder":
        files = sorted(p for p in root.iterdir() if _is_image(p))
    elif layout == "glob":
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    else:
        lines = [line.strip() for line in root.read_text().splitlines()]
        files = [root.parent / line for line in lines if line and not line.startswith("#")]
    if not files:
        raise FileNotFoundError(f"no images found in {source} (layout {layout})")
    return [os.path.abspath(p) for p in files]


def class_folders(source: str, layout: str) -> tuple[str, ...]:
    """The class folders of an ImageFolder source, sorted (label i is the i-th)."""
    if (_guess_layout(source) if layout == "auto" else layout) != "imagefolder":
        raise ValueError(f"labels from folders need an ImageFolder source (one sub-folder per class); {source} is not one")
    return tuple(sorted(d.name for d in Path(source).iterdir() if d.is_dir()))


def source_root(source: str) -> str:
    """The folder a source's files are listed under: the folder itself, a glob's fixed leading
    folders, or a file list's folder."""
    if glob.has_magic(source):
        fixed = []
        for part in Path(source).parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        return os.path.abspath(os.path.join(*fixed)) if fixed else os.getcwd()
    path = Path(source)
    return os.path.abspath(path.parent if path.is_file() else path)


def _guess_layout(source: str) -> str:
    if glob.has_magic(source):
        return "glob"
    path = Path(source)
    if path.is_file():
        return "filelist"
    if not path.is_dir():
        raise FileNotFoundError(f"{source} is neither a folder, a file list nor a glob pattern")
    return "imagefolder" if any(d.is_dir() for d in path.iterdir()) else "folder"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    format: str
    reencoded: bool
    size: tuple[int, int]  # (width, height) stored
    source_size: tuple[int, int]


def image_bytes(path: str, policy: ImagePolicy = ImagePolicy()) -> StoredImage:
    """The bytes to store for ``path`` and their format; raises on anything undecodable."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        source_size = img.size
        size = policy.stored_size(source_size)
        if size != source_size:
            img.draft("RGB", size)  # JPEG: decode at a reduced scale
        img.load()  # a full decode: truncated and damaged files fail here, not at training time
        kept = KEPT_FORMATS.get(img.format or "")
        if kept and size == source_size and (policy.quality is None or kept == "jpeg"):
            return StoredImage(data, kept, False, source_size, source_size)
        # Training decodes to RGB: converting first loses nothing it would see.
        out = img.convert("RGB")
        if size != source_size:
            out = out.resize(size, Image.Resampling.LANCZOS)
        # A JPEG source stays JPEG when shrunk; others are lossless unless a quality asks for JPEG.
        as_jpeg = policy.quality is not None or img.format == "JPEG"
        buffer = io.BytesIO()
        if as_jpeg:
            out.save(buffer, format="JPEG", quality=policy.quality or 95)
        else:
            out.save(buffer, format="PNG")
        return StoredImage(buffer.getvalue(), "jpeg" if as_jpeg else "png", True, out.size, source_size)


def _fitting(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """``size`` scaled down, aspect kept, to at most ``max_pixels`` pixels."""
    scale = (max_pixels / (size[0] * size[1])) ** 0.5
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


# ---------------------------------------------------------------------------------------------
# Output: a local folder, or a staging folder uploaded to s3:// / gs:// through Streaming


class _Output:
    """Where shards, markers and the index go; remote files are staged locally then uploaded (to the
    S3 ``endpoint`` given; None: AWS)."""

    def __init__(self, url: str, staging: str, endpoint: str | None, timeout: float) -> None:
        self.url = url
        self.remote = "://" in url
        self.local = staging if self.remote else url
        self.endpoint = endpoint
        self.timeout = timeout
        self._uploader: Any = None
        self._downloader: Any = None

    def uploader(self) -> Any:
        """Streaming's uploader; on S3 with a client bounded by ``timeout`` (its own waits minutes)."""
        if self._uploader is None:
            self._uploader = uploader(self.local, self.url, self.endpoint, self.timeout)
        return self._uploader

    def store(self, basename: str) -> None:
        """Make ``local/basename`` part of the output (upload it when the output is remote)."""
        if self.remote:
            self.uploader().upload_file(basename)

    def stored_chunks(self) -> set[int]:
        """The numbers of the chunks whose marker is stored (one listing, no file read)."""
        if not self.remote:
            names = [p.name for p in Path(self.local, MARKER_DIR).glob("chunk.*.json")]
        else:
            names = [os.path.basename(k) for k in self.uploader().list_objects(f"{MARKER_DIR}/") or []]
            names = [n for n in names if n.startswith("chunk.") and n.endswith(".json")]
        return {int(name.split(".")[1]) for name in names}

    def markers(self, wanted: set[int] | None = None) -> dict[int, dict[str, Any]]:
        """The markers already stored (of the ``wanted`` chunks only, when given), by chunk number."""
        found = {}
        for number in self.stored_chunks():
            if wanted is None or number in wanted:
                marker = self.read_json(f"{MARKER_DIR}/chunk.{number:05}.json")
                if marker is not None:
                    found[int(marker["chunk"])] = marker
        return found

    def read_json(self, basename: str) -> Any:
        """A JSON file of the output, or None when it is not there."""
        path = os.path.join(self.local, basename)
        if not self.remote:
            return json.loads(Path(path).read_text()) if os.path.isfile(path) else None
        if self._downloader is None:  # one client for all the files read
            self._downloader = downloader(self.url, self.endpoint)
        try:
            self._downloader.download(f"{self.url}/{basename}", path, self.timeout)
        except Exception as err:
            if isinstance(err, FileNotFoundError) or error_code(err) in MISSING_CODES:
                return None
            raise
        try:
            return json.loads(Path(path).read_text())
        finally:
            os.remove(path)


def write_json(output: _Output, basename: str, obj: Any) -> None:
    """``obj`` as ``basename`` of the output, replaced atomically (then uploaded when remote)."""
    Path(output.local, basename).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(Path(output.local) / basename) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    output.store(basename)


# ---------------------------------------------------------------------------------------------
# Conversion


def _convert_chunk(job: tuple[_Chunk, str, str, str, str | None, float]) -> dict[str, Any]:
    """Worker: one chunk → one stored shard + its marker (returned)."""
    chunk, name, url, staging, endpoint, timeout = job
    try:
        return _write_chunk(chunk, name, _Output(url, staging, endpoint, timeout))
    except Exception as err:  # storage errors may not pickle back to the parent: send a plain one
        raise storage_error(url, err) from None


def _write_chunk(chunk: _Chunk, name: str, output: _Output) -> dict[str, Any]:
    marker: dict[str, Any] = {"chunk": chunk.number, "sources": chunk.digest, "shard": None, "written": 0,
                              "reencoded": 0, "rotated": 0, "resized": 0, "skipped": [], "downscaled": []}
    basename = f"shard.{chunk.number:05}.mds"
    os.makedirs(os.path.join(output.local, MARKER_DIR), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(output.local, MARKER_DIR)) as tmp:
        folder = os.path.join(tmp, "mds")
        columns = {**MDS_COLUMNS, "label": "int"} if chunk.classes else MDS_COLUMNS
        with MDSWriter(out=folder, columns=columns, hashes=MDS_HASHES, size_limit=None) as writer:
            for index, path in chunk.items:
                try:
                    image = image_bytes(path, chunk.policy)
                except UnidentifiedImageError:
                    marker["skipped"].append({"index": index, "path": path, "error": "not an image file PIL can read"})
                    continue
                except Exception as err:  # any other failure to read or decode: skip and report
                    marker["skipped"].append({"index": index, "path": path, "error": f"{type(err).__name__}: {err}"})
                    continue
                rotate = chunk.policy.rotation(os.path.relpath(path, chunk.root))
                sample = {"image": image.data, "format": image.format, "rotate": rotate, "dataset": name, "index": index}
                writer.write({**sample, "label": chunk.label(path)} if chunk.classes else sample)
                marker["written"] += 1
                marker["reencoded"] += int(image.reencoded)
                marker["rotated"] += int(rotate != 0)
                marker["resized"] += int(image.size != image.source_size)
                if chunk.policy.too_many_pixels(image.source_size):
                    marker["downscaled"].append(
                        {"index": index, "path": path, "from": list(image.source_size), "to": list(image.size)}
                    )
        shards = json.loads(Path(folder, "index.json").read_text())["shards"]
        if shards:
            (shard,) = shards
            os.replace(os.path.join(folder, shard["raw_data"]["basename"]), os.path.join(output.local, basename))
            shard["raw_data"]["basename"] = basename
            marker["shard"] = shard
    if marker["shard"] is not None:
        output.store(basename)
    write_json(output, f"{MARKER_DIR}/chunk.{chunk.number:05}.json", marker)
    return marker


def plan_chunks(
    files: Sequence[str], root: str, policy: ImagePolicy, samples_per_shard: int, classes: Sequence[str] = ()
) -> list[_Chunk]:
    """``files`` cut into chunks of ``samples_per_shard``: chunk ``k`` becomes ``shard.{k:05}.mds``
    (with a ``label`` column when ``classes`` are given)."""
    return [
        _Chunk(k, tuple((i, files[i]) for i in range(start, min(start + samples_per_shard, len(files)))), policy, root,
               tuple(classes))
        for k, start in enumerate(range(0, len(files), samples_per_shard))
    ]


@contextlib.contextmanager
def open_output(url: str, endpoint: str | None, timeout: float, check: bool = True) -> Iterator[_Output]:
    """The output folder ``url`` (its bucket answering at the S3 ``endpoint``, unless ``check`` is
    off because the caller checked it); a remote one is staged in a temporary folder, removed at the end."""
    if check:
        check_bucket(url, endpoint, timeout)
    staging = tempfile.mkdtemp(prefix="dune_convert_") if "://" in url else url
    try:
        yield _Output(url, staging, endpoint, timeout)
    finally:
        if staging != url:
            shutil.rmtree(staging, ignore_errors=True)


def convert_chunks(
    chunks: Sequence[_Chunk], name: str, output: _Output, *, workers: int | None, progress: bool, label: str
) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """Every chunk's marker, by chunk number, and the numbers of those kept from an earlier run (a
    stored marker matching the chunk's sources); the others are converted in parallel processes."""
    try:
        stored = output.markers({c.number for c in chunks})
        reused = {c.number for c in chunks if stored.get(c.number, {}).get("sources") == c.digest}
        done = {n: stored[n] for n in reused}
        jobs = [(c, name, output.url, output.local, output.endpoint, output.timeout) for c in chunks if c.number not in reused]
        for marker in _run(jobs, workers, progress, total=sum(len(job[0].items) for job in jobs), label=label) if jobs else ():
            done[marker["chunk"]] = marker
    except Exception as err:
        raise storage_error(output.url, err) from None
    return done, reused


def write_index(output: _Output, markers: Sequence[dict[str, Any]], report: ConvertReport, **extra: Any) -> None:
    """``convert_report.json``, then ``index.json`` from the chunks' markers in chunk order (last: it
    marks the split complete); ``extra`` keys go beside ``shards`` (Streaming reads only ``version``
    and ``shards``)."""
    write_json(output, REPORT_NAME, asdict(report))
    write_json(output, "index.json", {"version": 2, "shards": [m["shard"] for m in markers if m["shard"]], **extra})


def convert_dataset(
    source: str,
    out_root: str,
    name: str,
    *,
    layout: str = "auto",
    samples_per_shard: int = 512,
    workers: int | None = None,
    quality: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    split: str = "train",
    s3_endpoint_url: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    labels: str = "none",
) -> ConvertReport:
    """Convert one dataset's ``split`` into ``<out_root>/<name>`` (train) or ``<out_root>/<name>/val``
    (a folder, ``s3://…`` or ``gs://…``: an S3 store at ``s3_endpoint_url``, else at the launch
    environment's ``S3_ENDPOINT_URL``, else AWS); ``labels="folders"`` stores class labels (see the module)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose one of {' | '.join(SPLITS)}")
    if not is_plain_name(name):
        raise ValueError(f"dataset name {name!r} must be a folder name (not empty, no '/', not '..'): it names {out_root}/NAME")
    if max_pixels < 0:
        raise ValueError(f"max_pixels must be 0 (no limit) or positive, got {max_pixels}")
    if quality is not None and not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")
    if labels not in LABELS:
        raise ValueError(f"labels {labels!r} is unknown; choose one of {' | '.join(LABELS)}")
    policy = ImagePolicy(quality, max_pixels, ROTATIONS.get(name.lower(), ()))
    files = list_sources(source, layout)
    classes = class_folders(source, layout) if labels == "folders" else ()
    chunks = plan_chunks(files, source_root(source), policy, samples_per_shard, classes)
    url = f"{out_root.rstrip('/')}/{name}" + ("/val" if split == "val" else "")
    with open_output(url, s3_endpoint(s3_endpoint_url), timeout) as output:
        done, reused = convert_chunks(chunks, name, output, workers=workers, progress=progress, label=name)
        markers = [done[c.number] for c in chunks]
        report = ConvertReport.from_markers(name, url, len(files), markers, len(reused))
        report.classes = list(classes)
        write_index(output, markers, report=report)
        return report


def _run(jobs: Sequence[tuple[Any, ...]], workers: int | None, progress: bool, total: int, label: str) -> Iterator[dict[str, Any]]:
    """Chunks in parallel processes (forked before any progress thread starts), with a progress bar."""
    workers = min(workers if workers is not None else os.cpu_count() or 1, len(jobs))
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(_convert_chunk, jobs) if pool else map(_convert_chunk, jobs)
        if not progress:
            yield from results
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            columns = ("[bold]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            with Progress(*columns) as bar:
                task = bar.add_task(f"converting {label}", total=total)
                for marker in results:
                    bar.advance(task, marker["written"] + len(marker["skipped"]))
                    yield marker
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    if pool is not None:
        pool.close()
        pool.join()
