"""Data errors a user can act on: each message names the dataset, the shard (when there is one) and
what is wrong. The training program reports them as one line and exits with code 2."""

from __future__ import annotations

_WORKER_TRACEBACK = "\nOriginal Traceback"


class DataError(RuntimeError):
    """Damaged, missing or unreachable data (a truncated or deleted shard, a missing data root …).

    A DataLoader worker's error reaches the training process re-raised with the worker's whole
    traceback as its message; only the original message is kept, so the report stays one line.
    """

    def __init__(self, message: str) -> None:
        if _WORKER_TRACEBACK in message:
            marker = f"{type(self).__name__}: "
            message = message[message.rindex(marker) + len(marker):].strip() if marker in message else message
        super().__init__(message)


class MissingDataError(DataError, FileNotFoundError):
    """The data root, a dataset folder, its index.json or a shard file is not there."""

    @classmethod
    def for_root(cls, remote_root: str) -> MissingDataError:
        return cls(
            f"data.remote_root={remote_root!r} is not a folder: it must hold one MDS folder per dataset "
            "(or be an s3:// or gs:// URL)"
        )
