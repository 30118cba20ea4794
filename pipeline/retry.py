"""Transient or permanent: which errors are retried, and the retry itself (exponential backoff with full jitter).

The verdict comes from what the store says, found anywhere in an error's chain (``__cause__``/``__context__``; s3fs
keeps botocore's ``ClientError`` as the cause of the ``OSError`` it raises): the provider's error code, else its
HTTP status, else the local errno, else the kind of network failure.

* **transient** ("not now": retried for ``outage_s`` seconds, then :class:`StorageUnavailable`, which fails the
  *attempt*, never a clip): throttling (S3 ``SlowDown``/``Throttling``, Azure ``ServerBusy``, HTTP 429), timeouts
  (HTTP 408, ``RequestTimeout``, ``OperationTimedOut``, ``FSTimeoutError``), 5xx and ``InternalError``/
  ``ServiceUnavailable``, connection resets, and credentials rather than objects: expired tokens (``ExpiredToken``,
  ``TokenRefreshRequired``), ``RequestTimeTooSkewed`` (botocore corrects its clock on retry), wrong keys
  (``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, Azure ``AuthenticationFailed``, HTTP 401): a wrong key
  leaves shards undone for the next run instead of recording every clip as failed; also out-of-memory and CUDA
  errors;
* **permanent for the object** (a clip's read fails, recorded with the store's code): access denied to that object
  (S3 ``AccessDenied``/``AllAccessDisabled``, Azure ``AuthorizationPermissionMismatch``/``AuthorizationFailure``,
  HTTP 403, local ``EACCES``/``EPERM``), archived objects (S3 ``InvalidObjectState``: Glacier/Deep Archive, Azure
  ``BlobArchived``), missing ones (``NoSuchKey``, ``NoSuchBucket``, ``BlobNotFound``, HTTP 404/410), other 4xx,
  undecodable or empty bytes (``ValueError``);
* **fatal for the run**: an output that cannot be written (full, over quota, read-only, denied):
  :class:`OutputUnwritable`, raised by :mod:`pipeline.storage`'s writes, never retried.

Every storage operation of the pipeline goes through :func:`call` (listing, reads, output writes, done records,
the lock, the manifest); a file read in pieces goes through :class:`RetryingFile`. Only these leaf operations
retry, so retries never multiply; the clients' own retries are kept small (:func:`pipeline.storage.get_fs`) so that
the retry window is a bound.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import random
import threading
import time
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Exception class names (anywhere in the MRO) of network-level failures in the clients fsspec backends use
# (botocore/aiobotocore, aiohttp, urllib3/requests, http.client, google-auth, azure-core, huggingface_hub's httpx).
TRANSIENT_CLASS_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError", "HTTPClientError",
    "NoCredentialsError", "CredentialRetrievalError", "TokenRetrievalError",
    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientOSError", "ProtocolError", "IncompleteRead", "RemoteDisconnected", "TransportError",
    "RetryError", "TimeoutException", "NetworkError", "RemoteProtocolError",
    "ServiceRequestError", "ServiceResponseError",  # azure-core: the request did not get through, or no answer
    "OutOfMemoryError",  # torch.cuda's, and Ray's (its memory monitor killed the worker)
})
# provider error codes (S3, GCS, Azure): what the store says about the request
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
    "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "ServerBusy", "OperationTimedOut", "ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired",
    "RequestTimeTooSkewed", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthenticationFailed",
    "OperationAborted", "BadDigest", "XAmzContentSHA256Mismatch",  # a conflicting request; bytes hurt in transit
})
PERMANENT_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "InvalidObjectState", "NoSuchKey", "NoSuchBucket",
    "AuthorizationPermissionMismatch", "AuthorizationFailure", "BlobArchived", "BlobNotFound", "ContainerNotFound",
})
TRANSIENT_STATUSES = frozenset({401, 408, 429})  # and every 5xx; any other 4xx is permanent
GCSFS_FORBIDDEN = "Forbidden: "  # gcsfs answers a 403 with a plain OSError("Forbidden: {path}...") (no code kept)
# errno values that say the output cannot be written (on an input: that file cannot be read)
OUTPUT_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
# errno values of OSErrors that describe the request or the object, not the store's health
PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.ENOTDIR,
                              errno.EISDIR, errno.ENOENT}) | OUTPUT_FATAL_ERRNOS
_CUDA_MARKERS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error",
                 "device-side assert", "illegal memory access", "NCCL error")


class StorageUnavailable(OSError):
    """A storage operation kept failing with transient errors for the whole retry window: the attempt fails."""


class OutputUnwritable(OSError):
    """The output cannot be written (disk full, over quota, read-only, access denied): the run stops."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient errors for ``outage_s`` seconds, sleeping ``uniform(0, min(max_delay_s, base_s * 2**n))``
    before retry ``n`` (exponential backoff with full jitter)."""

    outage_s: float = 300.0
    base_s: float = 0.5
    max_delay_s: float = 15.0


_policy = RetryPolicy()
_local = threading.local()  # a thread's own, shorter window (see window())
_last_warning: dict[str, float] = {}
_warning_lock = threading.Lock()


def set_policy(policy: RetryPolicy) -> None:
    """The policy of this process (set by the driver, every task and every actor from the run's settings)."""
    global _policy
    _policy = policy


def policy() -> RetryPolicy:
    return _policy


@contextmanager
def window(seconds: float) -> Iterator[None]:
    """Within the block, this thread's calls retry for at most ``seconds`` (a lease renewal that must not outlast
    its lease), other threads keep the process's policy."""
    previous = getattr(_local, "policy", None)
    _local.policy = dataclasses.replace(previous or _policy, outage_s=min(seconds, (previous or _policy).outage_s))
    try:
        yield
    finally:
        _local.policy = previous


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its causes: ``__cause__`` / ``__context__`` and Ray's ``cause`` (a task's own error)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 16:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


def is_cuda_error(exc: BaseException) -> bool:
    """A CUDA failure (out of memory included); a non-OOM one can leave the device unusable (sticky)."""
    return any(isinstance(e, RuntimeError) and any(m in str(e) for m in _CUDA_MARKERS) for e in chain(exc))


def store_answer(exc: BaseException) -> tuple[str | None, int | None]:
    """The provider's error code and HTTP status carried by ``exc`` itself (botocore ``ClientError``, gcsfs
    ``HttpError``, Azure ``HttpResponseError``, huggingface_hub ``HfHubHTTPError``, aiohttp and requests errors)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    else:
        code = getattr(exc, "error_code", None)
        status = next((s for s in (getattr(exc, "status_code", None), getattr(response, "status_code", None),
                                   getattr(exc, "code", None), getattr(exc, "status", None))
                       if isinstance(s, int) and 400 <= s < 600), None)
    code = getattr(code, "value", code)  # Azure's StorageErrorCode enum
    return (str(code) if code else None), (status if isinstance(status, int) else None)


def _store_verdict(exc: BaseException) -> bool | None:
    code, status = store_answer(exc)
    if code in TRANSIENT_CODES:
        return True
    if code in PERMANENT_CODES:
        return False
    if status is None:
        return None
    return status in TRANSIENT_STATUSES or status >= 500


def _verdict(exc: BaseException) -> bool | None:
    """Transient (True), permanent (False), or nothing said by this error itself (None: ask its cause)."""
    if isinstance(exc, StorageUnavailable):
        return True
    if isinstance(exc, OutputUnwritable):
        return False
    store = _store_verdict(exc)
    if store is not None:
        return store
    if isinstance(exc, OSError) and exc.__cause__ is not None and _store_verdict(exc.__cause__) is not None:
        return None  # a client's translation of the store's answer (s3fs): the answer decides
    if isinstance(exc, MemoryError | ConnectionError | TimeoutError | asyncio.TimeoutError):
        return True  # fsspec's FSTimeoutError is an asyncio.TimeoutError (not the builtin one on Python 3.10)
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | ValueError):
        return False  # the object is missing, or the bytes are bad (ValueError: DecodeError, empty file, ...)
    if type(exc) is OSError and exc.errno is None and str(exc).startswith(GCSFS_FORBIDDEN):
        return False
    if any(cls.__name__ in TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__) or is_cuda_error(exc):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno not in PERMANENT_ERRNOS
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says "not now" rather than "never" (see the module docstring). An
    ``OSError`` without errno or store answer (a message only) is transient; anything else unknown is not."""
    for e in chain(exc):
        verdict = _verdict(e)
        if verdict is not None:
            return verdict
    return any(isinstance(e, OSError) for e in chain(exc))


def answer_of(exc: BaseException) -> str:
    """``"code, HTTP status"`` of the first store answer in ``exc``'s chain ("" if none), for failure messages."""
    for e in chain(exc):
        code, status = store_answer(e)
        if code or status:
            return ", ".join([*([code] if code else []), *([f"HTTP {status}"] if status else [])])
    return ""


def output_unwritable(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a write to the output, says the output cannot be written: a full, over-quota or
    read-only disk, a denied write, a missing bucket. A failed condition (409, 412, ``FileExistsError``: another
    writer got there first) is not that."""
    if is_transient(exc) or any(isinstance(e, FileExistsError) for e in chain(exc)):
        return False
    return any(isinstance(e, OutputUnwritable) or (isinstance(e, OSError) and e.errno in OUTPUT_FATAL_ERRNOS)
               or store_answer(e)[0] in PERMANENT_CODES or store_answer(e)[1] in (403, 404) for e in chain(exc))


def brief(exc: BaseException) -> str:
    """``Class: first line`` of an error (of its cause, for errors raised inside a Ray task)."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


def _warn(what: str, message: str) -> None:
    """Log a retry at WARNING at most every 30 s per operation kind (DEBUG otherwise)."""
    kind = what.split(" ", 1)[0]
    now = time.monotonic()
    with _warning_lock:
        loud = now - _last_warning.get(kind, -1e9) >= 30.0
        if loud:
            _last_warning[kind] = now
    log.log(logging.WARNING if loud else logging.DEBUG, message)


def call(fn: Callable[..., T], *args: Any, what: str, retry: RetryPolicy | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retrying transient errors (see :func:`is_transient`) with backoff and jitter for up
    to the policy's ``outage_s``; then :class:`StorageUnavailable`. Permanent errors are raised at once.
    ``what`` names the operation in log lines and errors (never put credentials in it)."""
    p = retry or getattr(_local, "policy", None) or _policy
    start, attempt = time.monotonic(), 0
    while True:
        try:
            return fn(*args, **kwargs)
        except StorageUnavailable:
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise
            elapsed = time.monotonic() - start
            if elapsed >= p.outage_s:
                raise StorageUnavailable(f"{what}: still failing after {elapsed:.0f} s and {attempt + 1} attempts "
                                         f"(the retry window, storage_retry_s, is {p.outage_s:.0f} s); last error "
                                         f"{brief(exc)}") from exc
            delay = min(random.uniform(0, min(p.max_delay_s, p.base_s * 2 ** attempt)), p.outage_s - elapsed)
            _warn(what, f"{what} failed with a transient error ({brief(exc)}); retry {attempt + 1} in {delay:.1f} s "
                        f"({elapsed:.0f} of {p.outage_s:.0f} s of retrying used)")
            time.sleep(delay)
            attempt += 1


class RetryingFile(io.RawIOBase):
    """A seekable, read-only view of a remote file whose every read is a ranged read through :func:`call`.

    Wrap it in ``io.BufferedReader(f, block)`` so that small reads share large range requests. Decoders that call
    back into Python (libsndfile's virtual I/O) may swallow an exception raised inside a read and see a short file
    instead; :attr:`error` keeps the first error, and :meth:`check` re-raises it, so a failed read can never pass for
    the end of the audio.
    """

    def __init__(self, fs: Any, path: str, size: int, what: str):
        super().__init__()
        self.fs, self.path, self.size, self.what = fs, path, size, what
        self.pos = 0
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        try:
            data = call(self.fs.cat_file, self.path, start=self.pos, end=self.pos + n, what=self.what)
        except BaseException as exc:
            self.error = self.error or exc
            raise
        if len(data) != n:
            self.error = self.error or StorageUnavailable(
                f"{self.what}: asked for bytes {self.pos}-{self.pos + n} of {self.size}, got {len(data)}")
            raise self.error
        buffer[:n] = data
        self.pos += n
        return n

    def check(self) -> None:
        """Raise the first read error, if any (call after the decoder is done with the file)."""
        if self.error is not None:
            raise self.error
