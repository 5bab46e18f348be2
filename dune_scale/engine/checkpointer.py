"""Checkpoints: one folder per save, written atomically, with a ``latest`` pointer.

A save goes to a hidden temporary folder; every rank writes its part, then the ranks hash the
written files (sha256, split between them); rank 0 writes a manifest (``COMPLETE``: every file,
its size and hash), fsyncs, renames the folder into place and only then moves ``latest``.

On resume a folder is used only if its manifest matches every file's size and content hash; else
the previous one is tried (a job killed in the middle of a save, a truncated or overwritten file).
When checkpoints exist but none is usable the run is refused, never restarted from zero behind the
user's back (``checkpoint.resume=never`` starts over deliberately).

With ``checkpoint.remote`` each complete folder is then uploaded (see ``remote_checkpoints``), and
``resume=auto`` falls back to the newest intact remote checkpoint when the local disk has none. With
``checkpoint.async_save`` the training loop is blocked only while the state is staged (FSDP: DCP's
``async_save`` copies it to CPU memory); writing, hashing, the manifest, ``latest`` and the upload
happen in a background thread on a process group of their own, so a crash in between leaves the
previous checkpoint as ``latest``. One save is in flight at a time: the next save and
:meth:`Checkpointer.finish` wait for it and raise what went wrong with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dune_scale.config import CheckpointConfig, DataConfig
from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpoint_files import CheckpointError, read_torch_file
from dune_scale.engine.remote_checkpoints import RemoteCheckpoints
from dune_scale.engine.run_files import CHECKPOINT_PREFIX, LATEST, MANIFEST, TRAINER_STATE, checkpoint_name, rank_state_file
from dune_scale.engine.strategies import Strategy
from dune_scale.files import atomic_write, escapes, fsync_path, is_plain_name, sha256_file

log = logging.getLogger(__name__)


def _write_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _my_share(names: list[str], dist_info: DistInfo) -> list[str]:
    """The files this rank hashes: the ranks split the work, each reads 1/world of the bytes."""
    return names[dist_info.rank :: dist_info.world_size]


def _gather_dicts(local: dict[str, Any], dist_info: DistInfo, group: Any = None) -> dict[str, Any]:
    if dist_info.world_size == 1 or not dist.is_initialized():
        return local
    parts: list[dict[str, Any]] = [{} for _ in range(dist_info.world_size)]
    dist.all_gather_object(parts, local, group=group)
    return {key: value for part in parts for key, value in part.items()}


def _listing(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        if not isinstance(listed, dict):
            raise TypeError(f"'files' is a {type(listed).__name__}, not a mapping")
        outside = [name for name in listed if escapes(folder, name)]
    except FileNotFoundError:
        raise CheckpointError(f"{folder.name}: no {MANIFEST} manifest (a save that did not finish)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder.name}: unreadable {MANIFEST} manifest ({err})") from None
    if outside:
        raise CheckpointError(f"{folder.name}: its {MANIFEST} manifest lists {outside[0]!r}, a path outside the checkpoint folder")
    return listed


def size_problems(folder: Path) -> list[str]:
    """Cheap check (no reading): every listed file is there with its recorded size."""
    try:
        listed = _read_manifest(folder)
    except CheckpointError as err:
        return [str(err)]
    problems = []
    for name, entry in listed.items():
        path = folder / name
        size = entry["size"] if isinstance(entry, dict) else entry
        if not path.is_file():
            problems.append(f"{folder.name}/{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{folder.name}/{name} has {path.stat().st_size} bytes, the manifest says {size}")
    return problems


def is_complete(folder: Path) -> bool:
    """The manifest exists and every file it lists is there with its recorded size."""
    return not size_problems(folder)


def verify(folder: Path, dist_info: DistInfo) -> list[str]:
    """Sizes, then content hashes (split between the ranks; collective): what is wrong, [] if usable.
    Every rank gets the same answer."""
    problems = size_problems(folder)
    if not problems:
        listed = _read_manifest(folder)
        hashed = [name for name, entry in listed.items() if isinstance(entry, dict)]
        for name in _my_share(hashed, dist_info):
            if sha256_file(folder / name) != listed[name]["sha256"]:
                problems.append(f"{folder.name}/{name}: content differs from its sha256 in the manifest (corrupt)")
    # Agree on the verdict (the size check saw the same files everywhere; hashes were split).
    found = _gather_dicts({str(dist_info.rank): problems}, dist_info)
    return [problem for rank in sorted(found, key=int) for problem in found[rank]]


class Stateful(Protocol):
    """What a checkpoint holds besides the strategy's model and optimizer files."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """The one place that decides when a checkpoint is written (``due``) and what it holds: each
    student strategy's files (in the sub-folder its key names; "" = the folder itself) plus the
    ``state_dict()`` of every named component, global (written by rank 0) and per rank."""

    def __init__(
        self, root: Path, keep_last: int, every_steps: int, dist: DistInfo,
        remote: RemoteCheckpoints | None = None, async_save: bool = False,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.every_steps = every_steps
        self.dist = dist
        self.remote = remote
        self.async_save = async_save
        self._pending: Future | None = None  # the background commit of the last async save
        # The background work's own process groups (gloo), made at the first async save: one for the
        # commit and one per strategy's write, since writes of several students run side by side and
        # collectives of two threads on one group would interleave differently on each rank.
        self._groups: dict[str, Any] = {}

    @classmethod
    def from_config(cls, root: Path, checkpoint: CheckpointConfig, data: DataConfig, dist: DistInfo) -> Checkpointer:
        """The ``checkpoint`` section's checkpointer; a remote store uses the ``data`` section's
        endpoint, credentials, timeout and retries."""
        remote = RemoteCheckpoints.from_config(checkpoint, data)
        return cls(root, checkpoint.keep_last, checkpoint.every_steps, dist, remote, checkpoint.async_save)

    def due(self, step: int, final: bool) -> bool:
        """A periodic save after ``step`` (every ``checkpoint.every_steps``), or the run's last step."""
        return final or step % self.every_steps == 0

    def folder_for(self, step: int) -> Path:
        return self.root / checkpoint_name(step)

    def save(
        self,
        step: int,
        strategies: Mapping[str, Strategy],
        components: Mapping[str, Stateful],
        rank_components: Mapping[str, Stateful],
    ) -> Path:
        """Collective save; returns the final folder (complete on return unless ``async_save``)."""
        started = time.perf_counter()
        self.finish()
        trainer_state = {name: component.state_dict() for name, component in components.items()}
        rank_state = {name: component.state_dict() for name, component in rank_components.items()}
        final = self.folder_for(step)
        tmp = self.root / f".tmp_{checkpoint_name(step)}"
        try:
            self._together(lambda: self._prepare(tmp, final, strategies))
            self._together(lambda: self._write_states(tmp, final, trainer_state, rank_state))
            if not self.async_save:
                for subdir, strategy in strategies.items():
                    with self._writing(final, f"the model and optimizer files in {tmp / subdir}"):
                        strategy.save(tmp / subdir)
                self._commit(tmp, final, step, [], None)
                log.info("checkpoint %s: training blocked %.3f s", final.name, time.perf_counter() - started)
                return final
            written = [
                strategy.save_async(tmp / subdir, self._background_group(f"write:{subdir}")) for subdir, strategy in strategies.items()
            ]
        except CheckpointError:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # give back the space a partial save took
            raise
        executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-commit")
        commit_group = self._background_group("commit")
        self._pending = executor.submit(self._commit, tmp, final, step, [w for w in written if w is not None], commit_group)
        executor.shutdown(wait=False)  # the submitted commit still runs to its end
        log.info("checkpoint %s: training blocked %.3f s (being written in the background)", final.name, time.perf_counter() - started)
        return final

    def _prepare(self, tmp: Path, final: Path, strategies: Mapping[str, Strategy]) -> None:
        """The main rank makes the empty temporary folder of a save."""
        if self.dist.is_main:
            with self._writing(final, f"the folder {tmp}"):
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                for subdir in strategies:
                    (tmp / subdir).mkdir(parents=True, exist_ok=True)

    def _write_states(self, tmp: Path, final: Path, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        rank_file = tmp / rank_state_file(self.dist.rank)
        with self._writing(final, str(rank_file)):
            torch.save(rank_state, rank_file)
        if self.dist.is_main:
            with self._writing(final, str(tmp / TRAINER_STATE)):
                torch.save(trainer_state, tmp / TRAINER_STATE)

    @contextlib.contextmanager
    def _writing(self, final: Path, what: str) -> Iterator[None]:
        """An OSError while writing ``what`` of checkpoint ``final`` (a full disk, a quota, a
        read-only mount; DCP wraps a rank's in its own exception) → one :class:`CheckpointError`
        naming the folder, the file and what stays resumable."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            yield
        except OSError as err:
            raise CheckpointError(self._write_failure(final, what, err)) from None
        except CheckpointException as err:
            failure = next((f for f, _ in err.failures.values() if isinstance(f, OSError)), None)
            if failure is None:
                raise
            raise CheckpointError(self._write_failure(final, what, failure)) from None

    def _write_failure(self, final: Path, what: str, err: OSError) -> str:
        pointer = self.root / LATEST
        kept = (
            f"the previous checkpoint {pointer.read_text().strip()} stays the latest and is what a resume loads"
            if pointer.is_file() else "no earlier checkpoint exists"
        )
        cause = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        return f"checkpoint {final} could not be saved: writing {what} failed ({cause}); {kept}"

    def _background_group(self, purpose: str) -> Any:
        """The process group of one kind of background work (made in the same order on every rank:
        ``save`` asks in a fixed order); None (the default group) without several ranks."""
        if self.dist.world_size == 1 or not dist.is_initialized():
            return None
        if purpose not in self._groups:
            self._groups[purpose] = dist.new_group(backend="gloo")
        return self._groups[purpose]

    def finish(self) -> None:
        """Wait for the save in flight (``async_save``); raise what went wrong with it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _commit(self, tmp: Path, final: Path, step: int, written: list[Future], group: Any) -> None:
        """Once every rank's files are written (``written``: the strategies' writes in flight): hash
        them, write the manifest, rename the folder into place, move ``latest``; then upload it.
        Collective over ``group``."""
        for write in written:
            with self._writing(final, f"the model and optimizer files in {tmp}"):
                write.result()
        if dist.is_initialized():
            dist.barrier(group=group)
        names = _listing(tmp)
        files = _gather_dicts(
            {name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in _my_share(names, self.dist)},
            self.dist,
            group,
        )
        self._together(lambda: self._publish(tmp, final, step, names, files), group)
        if self.remote is not None:
            self._upload(final, names, group)

    def _publish(self, tmp: Path, final: Path, step: int, names: list[str], files: dict[str, Any]) -> None:
        """Main rank: flush the files, write the manifest, rename the folder into place, move
        ``latest``. A failure removes the temporary folder: ``latest`` still names the previous one."""
        if not self.dist.is_main:
            return
        try:
            with self._writing(final, f"the {MANIFEST} manifest and the rename of {tmp}"):
                for name in names:
                    fsync_path(tmp / name)
                _write_atomic(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_path(self.root)
            with self._writing(final, f"the pointer {self.root / LATEST}"):
                _write_atomic(self.root / LATEST, final.name + "\n")
        except CheckpointError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()

    def _upload(self, folder: Path, names: list[str], group: Any) -> None:
        """Each rank uploads its share of the files (the share it hashed: the upload bandwidth of
        every node is used), then the main rank checks and publishes the remote folder."""
        remote = self.remote
        self._together(lambda: remote.begin(folder.name) if self.dist.is_main else None, group)
        self._together(lambda: remote.upload(folder, _my_share(names, self.dist)), group)
        self._together(lambda: remote.publish(folder, self.keep_last) if self.dist.is_main else None, group)

    def _together(self, work: Callable[[], None], group: Any = None) -> None:
        """Run ``work`` on this rank, then raise on every rank the first error any rank met: no
        rank is left waiting in a collective for one that failed."""
        try:
            work()
            problem = ""
        except CheckpointError as err:
            problem = str(err)
        except Exception as err:  # noqa: BLE001 - named and raised on every rank below
            problem = f"{type(err).__name__}: {err}"
        found = _gather_dicts({str(self.dist.rank): problem}, self.dist, group)
        problems = [found[rank] for rank in sorted(found, key=int) if found[rank]]
        if problems:
            raise CheckpointError(problems[0])

    def _prune(self) -> None:
        complete = [p for p in self.completed() if p.name != (self.root / LATEST).read_text().strip()]
        for stale in complete[: max(0, len(complete) - (self.keep_last - 1))]:
            shutil.rmtree(stale, ignore_errors=True)

    def completed(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        return [p for p in sorted(self.root.glob(f"{CHECKPOINT_PREFIX}*")) if p.is_dir() and is_complete(p)]

    def find_latest(self) -> Path | None:
        """The folder ``latest`` names if intact, else the newest intact one (with a warning naming
        what is wrong with each one skipped); None when there is no checkpoint at all. Raises
        :class:`CheckpointError` listing the problems when checkpoints exist but none is usable.
        Collective (the ranks share the hashing)."""
        folders = sorted(self.root.glob(f"{CHECKPOINT_PREFIX}*"), reverse=True) if self.root.is_dir() else []
        named = self.latest_named()
        if named is not None and named.is_dir():
            folders = [named] + [f for f in folders if f != named]
        problems: list[str] = []
        for folder in folders:
            found = verify(folder, self.dist)
            if not found:
                return folder
            log.warning("checkpoint %s is incomplete or corrupt, looking for an older one: %s", folder, "; ".join(found))
            problems += found
        if folders:
            raise CheckpointError(
                f"checkpoints exist in {self.root} but none can be resumed from:\n  " + "\n  ".join(problems)
                + "\nuse checkpoint.resume=never to start over (overwriting them), or a new run.output_dir"
            )
        return None

    def latest_named(self) -> Path | None:
        """The folder the ``latest`` pointer names (None without a pointer). A pointer that leads
        outside the checkpoints folder (a symbolic link, ``..``, an absolute path) is refused: a
        file in a shared folder must not make the run read, and unpickle, a checkpoint elsewhere."""
        pointer = self.root / LATEST
        if not (pointer.is_file() or pointer.is_symlink()):
            return None
        if pointer.is_symlink():
            raise CheckpointError(
                f"{pointer}: `latest` is a symbolic link to {os.readlink(pointer)}, not the pointer file checkpoints "
                f"write; refusing to follow it (remove it: the newest complete checkpoint is then used)"
            )
        name = pointer.read_text().strip()
        if not is_plain_name(name) or escapes(self.root, name):
            raise CheckpointError(
                f"{pointer}: `latest` points to {name!r}, outside {self.root}; refusing to read a checkpoint from "
                "there (remove it: the newest complete checkpoint is then used)"
            )
        return self.root / name

    def resume_folder(self, resume: str) -> Path | None:
        """What ``checkpoint.resume`` names: ``auto`` (the latest intact one, or None for a new run),
        ``never`` (None) or a checkpoint folder, which must exist and be intact."""
        if self.remote is not None:
            self._together(self.remote.check)  # fail fast: missing bucket, no credentials, a silent store
        if resume == "never":
            return None
        if resume == "auto":
            return self.find_latest() if self.remote is None else self._find_latest_or_fetch()
        folder = Path(resume)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint.resume: {folder} is not a checkpoint folder (no such directory)")
        problems = verify(folder, self.dist)
        if problems:
            raise CheckpointError(f"checkpoint.resume: {folder} cannot be resumed from: " + "; ".join(problems))
        return folder

    def _find_latest_or_fetch(self) -> Path | None:
        """The local latest intact checkpoint, else the newest intact remote one, downloaded once
        per node (local rank 0; the other ranks wait for it)."""
        try:
            found = self.find_latest()
        except CheckpointError as err:
            log.warning("%s\nlooking in %s", err, self.remote.url)
            found = None
        if found is not None:
            return found

        def fetch() -> None:
            if self.dist.local_rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                self.remote.fetch_newest(self.root, tag=f"rank{self.dist.rank}")

        self._together(fetch)
        return self.find_latest()

    def load(
        self,
        folder: Path,
        strategies: Mapping[str, Strategy],
        components: Mapping[str, Stateful],
        rank_components: Mapping[str, Stateful],
    ) -> None:
        """Restore every strategy and component from ``folder``."""
        if not is_complete(folder):
            raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt (its {MANIFEST} manifest does not match)")
        trainer_state = read_trainer_state(folder)
        rank_file = folder / rank_state_file(self.dist.rank)
        # A rank that did not exist at save time (resumed on more ranks) gets empty states (fresh RNG streams).
        rank_state = read_torch_file(rank_file) if rank_file.is_file() else {}
        for subdir, strategy in strategies.items():
            strategy.load(folder / subdir)
        for name, component in components.items():
            component.load_state_dict(trainer_state[name])
        for name, component in rank_components.items():
            component.load_state_dict(rank_state.get(name, {}))


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The global components' states of a checkpoint folder (``{component: state}``), for resuming
    and for tools that read a run's step and config (resume checks, export)."""
    return read_torch_file(folder / TRAINER_STATE)
