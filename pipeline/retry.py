"""Transient or permanent: which errors are retried, and the retry itself (exponential backoff with full jitter).

Only an error about a clip's own bytes is permanent for that clip: a missing object (404), an undecodable or empty
file, a header that lies. Everything that says "not now" rather than "never" is transient: storage and network
errors (5xx, SlowDown/throttling, timeouts, connection resets, expired credentials), out-of-memory and CUDA
errors. A transient error is retried with exponential backoff and jitter for up to ``outage_s`` seconds (an
outage of the store is ridden out); after that it raises :class:`StorageUnavailable`, which fails the *attempt*
(the shard is left undone and retried), never a clip.

Every storage operation of the pipeline goes through :func:`call` (listing, reads, output writes, done records,
the lock, the manifest); a file read in pieces goes through :class:`RetryingFile`. Only these leaf operations
retry, so retries never multiply.
"""

from __future__ import annotations

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
# (botocore/aiobotocore, aiohttp, urllib3/requests, http.client, google-auth, huggingface_hub's httpx).
TRANSIENT_CLASS_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError", "HTTPClientError",
    "NoCredentialsError", "CredentialRetrievalError", "TokenRetrievalError",
    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientOSError", "ProtocolError", "IncompleteRead", "RemoteDisconnected", "TransportError",
    "RetryError", "TimeoutException", "NetworkError", "RemoteProtocolError",
    "OutOfMemoryError",  # torch.cuda's, and Ray's (its memory monitor killed the worker)
})
# errno values of OSErrors that describe the request or the object, not the store's health
PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.ENOTDIR,
                              errno.EISDIR, errno.ENOENT})
_CUDA_MARKERS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error",
                 "device-side assert", "illegal memory access", "NCCL error")


class StorageUnavailable(OSError):
    """A storage operation kept failing with transient errors for the whole retry window: the attempt fails."""


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


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says "not now" rather than "never" (see the module docstring)."""
    for e in chain(exc):
        if isinstance(e, StorageUnavailable | MemoryError | ConnectionError | TimeoutError):
            return True
        if isinstance(e, FileNotFoundError | IsADirectoryError | NotADirectoryError | ValueError):
            return False  # the object is missing, or the bytes are bad (ValueError: DecodeError, empty file, ...)
        if any(cls.__name__ in TRANSIENT_CLASS_NAMES for cls in type(e).__mro__):
            return True
        if is_cuda_error(e):
            return True
        if isinstance(e, OSError):
            return e.errno not in PERMANENT_ERRNOS
    return False


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
