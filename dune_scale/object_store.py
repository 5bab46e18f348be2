"""The S3 client and its error codes, shared by the data loader, the converter and remote
checkpoints. Apart from ``dune_scale.data.remote`` because that one needs Streaming, and a run
that only saves checkpoints (e.g. ``make gpu-check`` on a machine without Streaming) must not."""

from __future__ import annotations

import os
from typing import Any

DENIED_CODES = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def configure_s3_endpoint(url: str | None) -> None:
    """Point Streaming's S3 clients (they read ``S3_ENDPOINT_URL``) at an S3-compatible store.

    Set in the environment so DataLoader workers, which build their own clients, inherit it.
    """
    if url:
        os.environ["S3_ENDPOINT_URL"] = url


def error_code(err: BaseException) -> str | None:
    """The storage error code of a botocore ClientError or a google-api-core HTTP error."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code"))
    code = getattr(err, "code", None)
    return str(code) if code is not None else None


def bounded_s3_client(timeout: float, attempts: int = 1) -> Any:
    """An S3 client (``S3_ENDPOINT_URL`` honoured) whose every request gives up after ``timeout``
    seconds without an answer, ``attempts`` times at most (botocore's defaults: 60 s, 5 attempts)."""
    from boto3.session import Session
    from botocore.config import Config

    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": attempts})
    return Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL"), config=config)
