"""Where shards live: local folders read in place, or object storage (s3://, gs://) cached on disk.

On top of Streaming's downloads this module adds what a long run on shared storage needs:

* a clear "access denied / bad credentials" error when the store answers 403 (Streaming reports
  it as "object not found"), checked once before any worker starts and again on every download;
* retries with exponential backoff for transient failures only (403/404 fail at once);
* a shard whose hash does not match index.json is downloaded once more, then the run stops with
  an error naming it;
* the fix for forked DataLoader workers sharing the parent's boto3 connection (NOTES.md): the
  parent reads every index.json through a client with a keep-alive socket; workers forked
  afterwards inherit client and socket, and several processes then read one TCP stream (stalls of
  exactly ``download_timeout``, garbled shards). The clients are dropped in the parent after
  setup and again in every worker, so each process opens its own connections;
* the S3 endpoint given explicitly: Streaming's S3 downloader and uploader read it from the
  environment (``S3_ENDPOINT_URL``); ours carry it as an attribute instead (:func:`downloader`,
  :func:`uploader`), which a forked worker inherits and a spawned one receives with the pickled
  stream, so nothing has to be written into the environment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

import torch.utils.data
from streaming import Stream, StreamingDataset
from streaming.base.format import Reader, get_index_basename
from streaming.base.storage import CloudDownloader, CloudUploader, S3Downloader, S3Uploader

from dune_scale.data.errors import DataError, MissingDataError
from dune_scale.data.mixture import Mixture
from dune_scale.data.schema import index_shards
from dune_scale.files import escapes
from dune_scale.object_store import DENIED_CODES, MISSING_CODES, bounded_s3_client, endpoint_name, error_code

logger = logging.getLogger(__name__)

# The hash the converter writes and the loader checks on every downloaded shard (fast, in MDS).
SHARD_HASH = "xxh64"
_BACKOFF_S = 1.0


def file_hash(path: str) -> str:
    """The :data:`SHARD_HASH` digest of a file, read in pieces."""
    import xxhash

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, xxhash.xxh64).hexdigest()


class StorageAccessError(DataError, PermissionError):
    """The object store refused the request (HTTP 403): access denied or bad credentials."""


class ShardIntegrityError(DataError):
    """A shard still does not match its index.json hash after being downloaded again."""


def is_remote(root: str) -> bool:
    return "://" in root


def default_cache_dir(remote_root: str) -> Path:
    """A cache folder per remote root, so two runs on different data never share one."""
    digest = hashlib.blake2s(remote_root.encode(), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / "dune_scale_cache" / digest


def _access_denied(url: str, err: BaseException) -> StorageAccessError:
    return StorageAccessError(
        f"access denied / bad credentials reading {url}: the object store answered 403 ({err}). "
        "Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the GCS credentials), the bucket "
        "policy and data.s3_endpoint_url (AWS also answers 403 for a missing object when the "
        "credentials may not list the bucket)"
    )


def storage_error(url: str, err: Exception) -> Exception:
    """A 403 as :class:`StorageAccessError`; other storage-client errors as plain, picklable ones."""
    code = error_code(err)
    if code in DENIED_CODES:
        return _access_denied(url, err)
    if code is not None and type(err).__module__.startswith(("botocore", "google")):
        return RuntimeError(f"{url}: {type(err).__name__}: {err}")
    return err


class LocalStream(Stream):
    """A Stream over a local folder whose index.json errors name the file."""

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list[Reader]:
        return _checked_shards(self, lambda: super(LocalStream, self).get_shards(world, allow_unsafe_types))


def _checked_shards(stream: Stream, read: Any) -> list[Reader]:
    """Streaming's readers of ``stream``'s index.json (``read()``): a file it cannot parse, or that
    names a shard outside the stream's folder, is one :class:`DataError` naming it."""
    index = Path(stream.local, stream.split or "", get_index_basename())
    dataset = os.path.basename((stream.remote or stream.local).rstrip("/"))
    try:
        shards = read()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        if index.is_file():
            index_shards(index, dataset)  # names the field, where it can
        raise DataError(f"dataset {dataset}: {index} is not a usable MDS index ({type(err).__name__}: {err})") from None
    for shard in shards:
        for raw, packed in shard.file_pairs:
            for info in (raw, packed):
                if info is not None and escapes(index.parent, info.basename):
                    raise DataError(f"dataset {dataset}: {index} names shard file {info.basename!r}, outside {index.parent}")
    return shards


class _EndpointS3Downloader(S3Downloader):
    """Streaming's S3 downloader talking to ``endpoint`` (None: AWS), where Streaming's own reads the
    endpoint from the environment; its client settings otherwise as Streaming makes them."""

    def __init__(self, endpoint: str | None) -> None:
        super().__init__()
        self.endpoint = endpoint

    def _create_s3_client(self, unsigned: bool = False, timeout: float = 60.0) -> None:
        from boto3.session import Session
        from botocore import UNSIGNED
        from botocore.config import Config

        signature = {"signature_version": UNSIGNED} if unsigned else {}
        config = Config(read_timeout=timeout, retries={"mode": "adaptive"}, **signature)
        self._s3_client = Session().client("s3", config=config, endpoint_url=self.endpoint)


class _BoundedS3Uploader(S3Uploader):
    """Streaming's S3 uploader with a client of ``endpoint`` bounded by ``timeout`` (Streaming's own
    reads the endpoint from the environment and waits minutes on a silent store)."""

    def __init__(self, local: str, remote: str, endpoint: str | None, timeout: float) -> None:
        # Not S3Uploader.__init__: it would build (and ask the bucket through) its own client first.
        CloudUploader.__init__(self, (local, remote), exist_ok=True)
        self.s3 = bounded_s3_client(endpoint, timeout, attempts=3)
        self.check_bucket_exists(self.remote)


def downloader(url: str, endpoint: str | None) -> CloudDownloader:
    """Streaming's downloader for ``url``'s scheme; for ``s3://`` one of ``endpoint``."""
    if urllib.parse.urlparse(url).scheme == "s3":
        return _EndpointS3Downloader(endpoint)
    return CloudDownloader.get(url)


def uploader(local: str, url: str, endpoint: str | None, timeout: float) -> CloudUploader:
    """Streaming's uploader from the folder ``local`` to ``url``; for ``s3://`` one of ``endpoint``
    whose requests give up after ``timeout`` seconds."""
    if urllib.parse.urlparse(url).scheme == "s3":
        return _BoundedS3Uploader(local, url, endpoint, timeout)
    return CloudUploader.get((local, url), exist_ok=True)


class RemoteStream(Stream):
    """A Stream whose downloads name 403s, skip pointless retries and re-fetch a bad shard once, from
    the S3 ``endpoint`` given (None: AWS)."""

    def __init__(self, *, endpoint: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._downloader = downloader(self.remote, endpoint)

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        remote = os.path.join(self.remote, self.split, from_basename)
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        failures = 0
        while True:
            try:
                self._downloader.download(remote, local, self.download_timeout)
                return local
            except Exception as err:
                code = error_code(err)
                if code in DENIED_CODES:
                    raise _access_denied(remote, err) from None
                failures += 1
                if code in MISSING_CODES or failures > self.download_retry:
                    raise
                self._downloader.clean_up()  # a fresh connection for the next attempt
                delay = _BACKOFF_S * 2 ** (failures - 1) * (1 + random.random() / 2)
                logger.warning("download of %s failed (%s); retry %d/%d in %.1f s", remote, err, failures, self.download_retry, delay)
                time.sleep(delay)

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list[Reader]:
        """Read the index; check downloads against the shards' hash when the index lists it."""
        shards = _checked_shards(self, lambda: super(RemoteStream, self).get_shards(world, allow_unsafe_types))
        if self.validate_hash is None and shards and all(
            SHARD_HASH in raw.hashes for shard in shards for raw, _ in shard.file_pairs
        ):
            self.validate_hash = SHARD_HASH
        return shards

    def prepare_shard(self, shard: Reader) -> int:
        try:
            return super().prepare_shard(shard)
        except ValueError as err:
            if not str(err).startswith("Checksum failure"):
                raise
        name = shard.file_pairs[0][0].basename
        logger.warning("shard %s of %s does not match its hash; downloading it again", name, self.remote)
        shard.evict()
        try:
            return super().prepare_shard(shard)
        except ValueError as err:
            if not str(err).startswith("Checksum failure"):
                raise
            shard.evict()
            dataset = os.path.basename(self.remote.rstrip("/"))
            raise ShardIntegrityError(
                f"dataset {dataset}, shard {os.path.join(self.remote, self.split, name)} does not match its {self.validate_hash} "
                f"hash in index.json, also after downloading it again: the stored shard is damaged "
                f"(re-convert that dataset or restore the shard)"
            ) from None


def check_access(
    remote_root: str, names: Sequence[str], endpoint: str | None, timeout: float = 60.0, split: str | None = None
) -> None:
    """Fail fast, before any worker starts, when an S3 store (``endpoint``; None: AWS) refuses us,
    lacks an index.json or does not answer within ``timeout`` seconds (one attempt per request: a
    silent endpoint costs at most ``timeout`` per dataset, not botocore's retries of it)."""
    if urllib.parse.urlparse(remote_root).scheme != "s3":
        return
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, NoCredentialsError, ReadTimeoutError

    client = bounded_s3_client(endpoint, timeout)
    try:
        for name in names:
            url = "/".join(p for p in (remote_root.rstrip("/"), name, split, get_index_basename()) if p)
            parsed = urllib.parse.urlparse(url)
            try:
                client.head_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
            except NoCredentialsError:
                return  # no credentials at all: Streaming reads public buckets unsigned
            except (ConnectionError, ReadTimeoutError) as err:  # timeouts and refused connections
                raise DataError(
                    f"dataset {name}: no answer from the object store for {url} within data.download_timeout="
                    f"{timeout:g} s (endpoint {endpoint_name(endpoint)}): {err}"
                ) from None
            except ClientError as err:
                code = error_code(err)
                if code in DENIED_CODES:
                    raise _access_denied(url, err) from None
                if code in MISSING_CODES:
                    raise MissingDataError(
                        f"dataset {name}: no MDS index at {url} (data.remote_root must hold one MDS "
                        f"folder per dataset, named after it{_split_layout(split)})"
                    ) from None
                raise DataError(f"dataset {name}: {url}: {err}") from None
            except BotoCoreError as err:
                raise DataError(f"dataset {name}: {url}: {err}") from None
    finally:
        client.close()


def check_bucket(url: str, endpoint: str | None, timeout: float) -> None:
    """The bucket of an ``s3://`` URL answers at ``endpoint`` within ``timeout`` (Streaming's
    uploader would wait minutes on a silent endpoint before its first byte)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3":
        return
    from botocore.exceptions import ConnectionError, ReadTimeoutError

    client = bounded_s3_client(endpoint, timeout)
    try:
        client.head_bucket(Bucket=parsed.netloc)
    except (ConnectionError, ReadTimeoutError) as err:
        raise DataError(
            f"{url}: no answer from the object store within {timeout:g} s "
            f"(endpoint {endpoint_name(endpoint)}): {err}"
        ) from None
    except Exception as err:  # 403, missing bucket, no credentials ...: as the storage client names it
        named = storage_error(url, err)
        raise named if isinstance(named, DataError) else DataError(f"{url}: {type(err).__name__}: {err}") from None
    finally:
        client.close()


def _split_layout(split: str | None) -> str:
    return f", with the {split} split in its subfolder {split}/" if split else ""


def build_streams(
    mixture: Mixture, remote_root: str, endpoint: str | None, local_cache: str = "", split: str | None = None
) -> list[Stream]:
    """One Stream per dataset ``<remote_root>/<name>[/<split>]``; local roots are read in place (no
    copy), remote ones downloaded from the S3 ``endpoint`` given (None: AWS) or GCS."""
    streams: list[Stream] = []
    if not is_remote(remote_root) and not Path(remote_root).is_dir():
        raise MissingDataError.for_root(remote_root)
    for spec in mixture.streams:
        if is_remote(remote_root):
            cache = Path(local_cache) if local_cache else default_cache_dir(remote_root)
            streams.append(
                RemoteStream(
                    endpoint=endpoint,
                    remote=f"{remote_root.rstrip('/')}/{spec.name}",
                    local=str(cache / spec.name),
                    split=split,
                    proportion=spec.proportion,
                )
            )
            continue
        folder = Path(remote_root, spec.name, split or "")
        check_local_shards(folder, spec.name, split)
        streams.append(LocalStream(local=str(folder.resolve()), proportion=spec.proportion))
    return streams


def check_local_shards(folder: Path, name: str, split: str | None = None) -> None:
    """Every shard index.json lists is there (one folder listing), and on rank 0 has its size (one
    stat per shard: tens of thousands on a shared file system, so not on every rank): a deleted or
    truncated shard is named before training starts, not met hours later with Streaming's
    unrelated message. Shards damaged later are named when they are read."""
    index = folder / get_index_basename()
    if not index.is_file():
        raise MissingDataError(
            f"dataset {name}: no MDS index at {index} (data.remote_root must hold one MDS folder per "
            f"dataset, named after it{_split_layout(split)})"
        )
    shards = index_shards(index, name)
    listed = set(os.listdir(folder))

    def present(basename: str) -> bool:  # a merged index may name shards in subfolders
        return basename in listed or ("/" in basename and (folder / basename).is_file())

    check_sizes = os.environ.get("RANK", "0") == "0"
    for shard in shards:
        raw, packed = shard["raw_data"], shard.get("zip_data")
        path = folder / raw["basename"]
        if present(raw["basename"]):
            size = path.stat().st_size if check_sizes else raw["bytes"]
            if size != raw["bytes"]:
                raise DataError(
                    f"dataset {name}, shard {path}: {size} bytes where index.json says {raw['bytes']} "
                    "(truncated or damaged); re-convert the dataset or restore the file"
                )
        elif not (packed and present(packed["basename"])):
            raise MissingDataError(
                f"dataset {name}, shard {path}: the file is missing; re-convert the dataset or restore the file"
            )


def release_connections(streams: Sequence[Stream]) -> None:
    """Drop every stream downloader's client (and its pooled sockets) so no fork inherits them."""
    for stream in streams:
        stream._downloader.clean_up()


def reset_worker_connections(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: this worker opens its own storage connections."""
    info = torch.utils.data.get_worker_info()
    dataset: Any = info.dataset if info is not None else None
    if isinstance(dataset, StreamingDataset):
        release_connections(dataset.streams)
