"""A copy of every complete checkpoint in object storage (``checkpoint.remote=s3://bucket/prefix``).

Clusters keep checkpoints in object storage: node-local disks are wiped between jobs. The remote
layout mirrors the local one: ``<prefix>/step_N/<files>``, ``<prefix>/step_N/COMPLETE`` and
``<prefix>/latest``. A checkpoint folder is an opaque tree of files that its manifest lists.

* Publishing: any old manifest of that name is deleted first, then the files go up (each rank its
  share of the manifest's listing, the same share it hashed), then the store's listing is checked
  against the manifest's sizes, and only then the manifest goes up, LAST: a remote folder without
  one is known incomplete. Then ``latest`` moves and ``checkpoint.keep_last`` is applied.
* Fetching: the newest remote folder with a manifest is downloaded; every file is hashed while it
  is written and must match the manifest's size and sha256 (end-to-end integrity: what was hashed
  on the training node is what is resumed from). A folder that does not is named and skipped.
* Credentials, endpoint (``data.s3_endpoint_url``), the per-request timeout
  (``data.download_timeout``) and retries of transient failures (``data.download_retry``) are the
  data section's: the client comes from :func:`dune_scale.object_store.bounded_s3_client`, so a dead
  store fails a request after the timeout, never hangs the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dune_scale.config import CheckpointConfig, DataConfig
from dune_scale.engine.checkpoint_files import CheckpointError
from dune_scale.engine.run_files import CHECKPOINT_PREFIX, LATEST, MANIFEST
from dune_scale.object_store import DENIED_CODES, MISSING_CODES, bounded_s3_client, endpoint_name, error_code, s3_endpoint

log = logging.getLogger(__name__)

_DELETE_BATCH = 1000  # S3's DeleteObjects limit


class RemoteCheckpointError(CheckpointError):
    """The checkpoint store refused or failed a request (named: bucket, key, cause)."""


class RemoteCheckpoints:
    """One ``s3://bucket/prefix`` (at the S3 ``endpoint``; None: AWS) holding a run's checkpoints;
    every method names what failed."""

    def __init__(self, url: str, endpoint: str | None, timeout: float, attempts: int) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise RemoteCheckpointError(f"checkpoint.remote: {url!r} is not an s3://bucket/prefix URL")
        self.url = url.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint = endpoint
        self.timeout = timeout
        self.attempts = attempts

    @classmethod
    def from_config(cls, checkpoint: CheckpointConfig, data: DataConfig) -> RemoteCheckpoints | None:
        if checkpoint.remote is None:
            return None
        return cls(checkpoint.remote, s3_endpoint(data.s3_endpoint_url), data.download_timeout, data.download_retry + 1)

    # ------------------------------------------------------------------ requests
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _client(self) -> Any:
        return bounded_s3_client(self.endpoint, self.timeout, self.attempts)

    def _failed(self, action: str, key: str, err: Exception) -> RemoteCheckpointError:
        from botocore.exceptions import ConnectionError, NoCredentialsError, ReadTimeoutError

        if isinstance(err, NoCredentialsError):
            cause = "no credentials (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile)"
        elif isinstance(err, (ConnectionError, ReadTimeoutError)):
            cause = (f"no answer from the object store (endpoint {endpoint_name(self.endpoint)}) within data.download_timeout="
                     f"{self.timeout:g} s, {self.attempts} attempt(s): {err}")
        elif error_code(err) in MISSING_CODES and not key:
            cause = "no such bucket"
        elif error_code(err) in DENIED_CODES:
            cause = f"access denied / bad credentials ({err}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
        else:
            cause = f"{type(err).__name__}: {err}"
        return RemoteCheckpointError(f"checkpoint.remote: {action} s3://{self.bucket}/{key} failed: {cause}")

    def check(self) -> None:
        """Fail fast, before training, when the bucket is missing, refused or silent."""
        client = self._client()
        try:
            client.head_bucket(Bucket=self.bucket)
        except Exception as err:
            raise self._failed("reaching bucket", "", err) from None
        finally:
            client.close()

    def _objects(self, client: Any, folder: str = "") -> Iterator[dict[str, Any]]:
        key = self._key(folder) + "/" if self._key(folder) else ""
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key):
                yield from page.get("Contents", [])
        except Exception as err:
            raise self._failed("listing", key, err) from None

    def _delete(self, client: Any, keys: list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            try:
                answer = client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            except Exception as err:
                raise self._failed("deleting", batch[0], err) from None
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise RemoteCheckpointError(
                    f"checkpoint.remote: deleting s3://{self.bucket}/{first.get('Key')} failed: {first.get('Code')} {first.get('Message')}"
                )

    def _get(self, client: Any, key: str) -> bytes | None:
        """An object's bytes; None when it does not exist."""
        try:
            return client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as err:
            if error_code(err) in MISSING_CODES:
                return None
            raise self._failed("reading", key, err) from None

    def _put(self, client: Any, key: str, body: bytes) -> None:
        try:
            client.put_object(Bucket=self.bucket, Key=key, Body=body)
        except Exception as err:
            raise self._failed("uploading", key, err) from None

    # ------------------------------------------------------------------ publishing
    def begin(self, name: str) -> None:
        """Before ``name``'s files go up: its remote manifest (of an earlier run) is removed, so the
        folder reads as incomplete until :meth:`publish` finishes it."""
        client = self._client()
        try:
            self._delete(client, [self._key(name, MANIFEST)])
        finally:
            client.close()

    def upload(self, folder: Path, names: list[str]) -> None:
        """Upload ``names`` (paths relative to ``folder``) into the remote folder of the same name."""
        client = self._client()
        try:
            for name in names:
                key = self._key(folder.name, name)
                try:
                    client.upload_file(str(folder / name), self.bucket, key)
                except Exception as err:
                    raise self._failed("uploading", key, err) from None
        finally:
            client.close()

    def publish(self, folder: Path, keep_last: int) -> None:
        """Check every uploaded file's size against the manifest, upload the manifest, move
        ``latest``, keep the newest ``keep_last`` complete checkpoints (main rank, after every
        rank's :meth:`upload`)."""
        manifest = (folder / MANIFEST).read_bytes()
        listed = json.loads(manifest)["files"]
        client = self._client()
        try:
            base = self._key(folder.name) + "/"
            stored = {obj["Key"][len(base) :]: obj["Size"] for obj in self._objects(client, folder.name)}
            for name, entry in listed.items():
                if stored.get(name) != entry["size"]:
                    raise RemoteCheckpointError(
                        f"checkpoint.remote: s3://{self.bucket}/{base}{name} holds {stored.get(name, 'no')} bytes after "
                        f"uploading, the manifest says {entry['size']}"
                    )
            self._put(client, self._key(folder.name, MANIFEST), manifest)
            self._put(client, self._key(LATEST), (folder.name + "\n").encode())
            self._prune(client, folder.name, keep_last)
        finally:
            client.close()
        log.info("checkpoint %s uploaded to %s/%s", folder.name, self.url, folder.name)

    def _folders(self, client: Any) -> dict[str, list[str]]:
        """Every remote ``step_*`` folder and its keys."""
        folders: dict[str, list[str]] = {}
        base = self._key() + "/" if self.prefix else ""
        for obj in self._objects(client):
            name = obj["Key"][len(base) :].split("/", 1)[0]
            if name.startswith(CHECKPOINT_PREFIX) and "/" in obj["Key"][len(base) :]:
                folders.setdefault(name, []).append(obj["Key"])
        return folders

    def _prune(self, client: Any, newest: str, keep_last: int) -> None:
        """Keep the ``keep_last`` newest complete folders up to ``newest``; older folders go,
        complete or not (an upload that died). Manifests go first: a half-deleted folder reads as
        incomplete."""
        folders = self._folders(client)
        complete = sorted(n for n, keys in folders.items() if n <= newest and self._key(n, MANIFEST) in keys)
        kept = complete[-keep_last:]
        stale = [n for n in folders if n < kept[0]]
        if stale:
            self._delete(client, [self._key(n, MANIFEST) for n in stale if self._key(n, MANIFEST) in folders[n]])
            self._delete(client, [k for n in stale for k in folders[n] if not k.endswith("/" + MANIFEST)])
            log.info("removed old remote checkpoints %s", ", ".join(sorted(stale)))

    # ------------------------------------------------------------------ fetching
    def fetch_newest(self, root: Path, tag: str) -> Path | None:
        """Download the newest intact remote checkpoint into ``root`` (``latest`` first, then the
        others newest first); None when the store holds none. ``tag`` keeps the temporary folders
        of several downloaders (one per node) apart on a shared disk."""
        client = self._client()
        try:
            folders = self._folders(client)
            pointer = self._get(client, self._key(LATEST))
            named = pointer.decode().strip() if pointer else None
            order = sorted(folders, reverse=True)
            if named in folders:
                order = [named] + [n for n in order if n != named]
            for name in order:
                problem = self._download(client, name, root, tag)
                if problem is None:
                    return root / name
                log.warning("remote checkpoint %s/%s cannot be resumed from, trying an older one: %s", self.url, name, problem)
            return None
        finally:
            client.close()

    def _download(self, client: Any, name: str, root: Path, tag: str) -> str | None:
        """Fetch one folder, checking every file against the manifest; what is wrong, or None."""
        manifest = self._get(client, self._key(name, MANIFEST))
        if manifest is None:
            return f"no {MANIFEST} manifest (an upload that did not finish)"
        try:
            listed = json.loads(manifest)["files"]
        except (ValueError, KeyError, TypeError) as err:
            return f"unreadable {MANIFEST} manifest ({err})"
        tmp = root / f".tmp_fetch_{tag}_{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for file, entry in listed.items():
                problem = self._fetch_file(client, self._key(name, file), tmp / file, entry)
                if problem is not None:
                    return f"{file}: {problem}"
            (tmp / MANIFEST).write_bytes(manifest)
            _move_into_place(tmp, root / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded checkpoint %s/%s to %s", self.url, name, root / name)
        return None

    def _fetch_file(self, client: Any, key: str, path: Path, entry: dict[str, Any]) -> str | None:
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        try:
            body = client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with open(path, "wb") as out:
                for chunk in body.iter_chunks(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
        except Exception as err:
            if error_code(err) in MISSING_CODES:
                return "missing in the store"
            raise self._failed("downloading", key, err) from None
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{size} bytes, the manifest says {entry['size']}"
        if digest.hexdigest() != entry["sha256"]:
            return "content differs from its sha256 in the manifest (corrupt)"
        return None


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the fetched folder into place; a folder already there (left locally, unusable, or
    placed meanwhile by another node's downloader on a shared disk) is replaced."""
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():  # not another downloader's identical copy: a real failure
            raise
