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


class CorruptSampleBudget:
    """Stops a run that would train on a damaged dataset (``data.max_corrupt_fraction``).

    Undecodable images are replaced by good ones and counted; once they exceed ``max_fraction`` of
    the samples read, the run stops with a :class:`DataError` naming the shards that held them. The
    share is taken of at least ``dataset_samples`` (the samples the shards hold): while fewer have
    been read, the count alone shows that much of the data is damaged, and a few bad images early
    in a run do not stop it.
    """

    def __init__(self, max_fraction: float, dataset_samples: int | None) -> None:
        self.max_fraction = max_fraction
        self.dataset_samples = dataset_samples or 0
        self.corrupt = 0
        self.samples = 0

    def record(self, corrupt: int, samples: int) -> bool:
        """Count ``corrupt`` undecodable images among ``samples`` read (all ranks); True when the
        budget is exceeded."""
        self.corrupt += corrupt
        self.samples += samples
        return self.corrupt > self.max_fraction * max(self.samples, self.dataset_samples)

    def error(self, shards: list[str]) -> DataError:
        share = self.corrupt / max(self.samples, 1)
        return DataError(
            f"{self.corrupt} of the {self.samples} images read ({share:.1%}) could not be decoded, more than "
            f"data.max_corrupt_fraction={self.max_fraction:g} allows; they are in {', '.join(shards) or 'unknown shards'}: "
            "re-convert those datasets or restore the shards (or raise data.max_corrupt_fraction)"
        )
