"""The S3 client and its error codes, shared by the data loader, the converter and remote
checkpoints. Apart from ``dune_scale.data.remote`` because that one needs Streaming, and a run
that only saves checkpoints (e.g. ``make gpu-check`` on a machine without Streaming) must not.

The endpoint of an S3-compatible store is passed explicitly to every client (nothing here writes
the environment): :func:`s3_endpoint` reads it once where a run or a command starts.
"""

from __future__ import annotations

import os
from typing import Any

DENIED_CODES = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def s3_endpoint(given: str | None) -> str | None:
    """The S3 endpoint to talk to: ``given`` (``data.s3_endpoint_url``, ``--s3-endpoint-url``), else
    the launch environment's ``S3_ENDPOINT_URL`` (the variable AWS tools and Streaming read), else
    None: AWS itself."""
    return given or os.environ.get("S3_ENDPOINT_URL") or None


def endpoint_name(endpoint: str | None) -> str:
    """The endpoint as messages name it."""
    return endpoint or "AWS"


def error_code(err: BaseException) -> str | None:
    """The storage error code of a botocore ClientError or a google-api-core HTTP error."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code"))
    code = getattr(err, "code", None)
    return str(code) if code is not None else None


def bounded_s3_client(endpoint: str | None, timeout: float, attempts: int = 1) -> Any:
    """An S3 client of ``endpoint`` (None: AWS) whose every request gives up after ``timeout``
    seconds without an answer, ``attempts`` times at most (botocore's defaults: 60 s, 5 attempts)."""
    from boto3.session import Session
    from botocore.config import Config

    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": attempts})
    return Session().client("s3", endpoint_url=endpoint, config=config)
