"""Errors classified by what the store says (provider code, HTTP status, errno), on the real clients' exception
objects; through the fault proxy, the retry window bounds a call whatever the client does, and a failed multipart
upload is aborted. Whole runs that meet these errors: tests/test_runs_on_bad_storage.py."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import pytest
from botocore.exceptions import ClientError
from fsspec.exceptions import FSTimeoutError
from s3fs.errors import translate_boto_error

from audio_fixtures import write_audio
from pipeline import retry, storage
from pipeline.sources.common import read_failure

REPO = Path(__file__).resolve().parents[1]


def s3_error(code: str, status: int, operation: str = "GetObject") -> OSError:
    """What s3fs raises for an S3 error answer: its translation of botocore's ClientError, kept as the cause."""
    response = {"Error": {"Code": code, "Message": f"{code} message"},
                "ResponseMetadata": {"HTTPStatusCode": status}}
    return translate_boto_error(ClientError(response, operation))


S3_TRANSIENT = [("SlowDown", 503), ("Throttling", 400), ("ThrottlingException", 400), ("RequestTimeout", 400),
                ("InternalError", 500), ("ServiceUnavailable", 503), ("ExpiredToken", 400),
                ("ExpiredTokenException", 400), ("TokenRefreshRequired", 400), ("RequestTimeTooSkewed", 403),
                ("InvalidAccessKeyId", 403), ("SignatureDoesNotMatch", 403), ("SomethingNew", 502)]
S3_PERMANENT = [("AccessDenied", 403), ("InvalidObjectState", 403), ("AllAccessDisabled", 403), ("NoSuchKey", 404),
                ("NoSuchBucket", 404), ("InvalidRange", 416), ("SomethingNew", 400)]


@pytest.mark.parametrize("code,status", S3_TRANSIENT)
def test_s3_transient_codes(code, status):
    exc = s3_error(code, status)
    assert retry.is_transient(exc), (code, type(exc), exc.errno)


@pytest.mark.parametrize("code,status", S3_PERMANENT)
def test_s3_permanent_codes(code, status):
    exc = s3_error(code, status)
    assert not retry.is_transient(exc), (code, type(exc), exc.errno)
    assert retry.answer_of(exc) == f"{code}, HTTP {status}"


def test_local_errors_and_timeouts():
    assert retry.is_transient(FSTimeoutError())  # an asyncio.TimeoutError, not the builtin one on Python 3.10
    for number in (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        exc = OSError(number, os.strerror(number), "/x")
        assert not retry.is_transient(exc) and retry.output_unwritable(exc)
    assert retry.is_transient(OSError(errno.EIO, "I/O error")) and not retry.output_unwritable(OSError(errno.EIO, ""))
    assert not retry.is_transient(retry.OutputUnwritable("cannot write x"))
    assert retry.output_unwritable(s3_error("AccessDenied", 403, "PutObject"))
    assert not retry.output_unwritable(s3_error("SlowDown", 503, "PutObject"))
    assert not retry.output_unwritable(s3_error("PreconditionFailed", 412, "PutObject"))  # a conditional write lost
    assert not retry.output_unwritable(FileExistsError(errno.EEXIST, "exists", "/x/_state/lock.json"))


def test_gcsfs_http_errors():
    gcs_retry = pytest.importorskip("gcsfs.retry", reason="gcsfs has no release for this fsspec version (it pins "
                                    "fsspec to its own), so it is not installed next to it")
    for status in (408, 429, 500, 503):
        assert retry.is_transient(gcs_retry.HttpError({"code": status, "message": "x"}))
    for status in (400, 403, 404):
        assert not retry.is_transient(gcs_retry.HttpError({"code": status, "message": "x"}))
    with pytest.raises(OSError) as forbidden:
        gcs_retry.validate_response(403, b'{"error": {"message": "denied"}}', "bucket/x.wav")
    assert not retry.is_transient(forbidden.value)


def test_gcsfs_forbidden_without_gcsfs():
    """gcsfs answers a 403 with a plain ``OSError("Forbidden: {path}\\n{message}")`` (its retry.validate_response)."""
    assert not retry.is_transient(OSError("Forbidden: bucket/x.wav\ndenied"))


def _azure_error(status: int, code: str | None):
    """An HttpResponseError on a real azure-core response, with ``error_code`` set as azure-storage-blob sets it."""
    exceptions = pytest.importorskip("azure.core.exceptions", reason="azure-core is not installed")
    import requests
    from azure.core.pipeline.transport import HttpRequest, RequestsTransportResponse

    raw = requests.Response()
    raw.status_code, raw.reason, raw._content = status, "reason", b""
    raw.headers["x-ms-error-code"] = code or ""
    exc = exceptions.HttpResponseError(response=RequestsTransportResponse(HttpRequest("GET", "https://a/b"), raw))
    exc.error_code = code
    return exc


@pytest.mark.parametrize("status,code,transient", [
    (503, "ServerBusy", True), (500, "OperationTimedOut", True), (500, "InternalError", True), (502, None, True),
    (403, "AuthenticationFailed", True), (403, "AuthorizationPermissionMismatch", False),
    (409, "BlobArchived", False), (403, None, False), (404, "BlobNotFound", False)])
def test_azure_http_response_errors(status, code, transient):
    assert retry.is_transient(_azure_error(status, code)) is transient


def _hub_error(status: int) -> OSError:
    """What ``hf_raise_for_status`` raises for a Hub answer (RepositoryNotFoundError, HfHubHTTPError, ...)."""
    httpx2 = pytest.importorskip("httpx2", reason="this huggingface_hub's responses are not httpx2's")
    from huggingface_hub.utils import hf_raise_for_status

    try:
        hf_raise_for_status(httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x")))
    except OSError as exc:
        return exc
    raise AssertionError(f"no error for HTTP {status}")


@pytest.mark.parametrize("status,transient", [(429, True), (500, True), (503, True), (401, True), (403, False),
                                              (404, False)])
def test_huggingface_hub_http_errors(status, transient):
    exc = _hub_error(status)
    assert retry.is_transient(exc) is transient, type(exc)


@pytest.mark.parametrize("make,answer", [
    (lambda: s3_error("InvalidObjectState", 403), "InvalidObjectState, HTTP 403"),
    (lambda: s3_error("SlowDown", 503), None),
    (lambda: _azure_error(409, "BlobArchived"), "BlobArchived, HTTP 409"),
    (lambda: _azure_error(503, "ServerBusy"), None),
    (lambda: _hub_error(403), "HTTP 403"),
    (lambda: _hub_error(429), None),
])
def test_a_read_error_fails_the_clip_or_the_attempt(make, answer):
    """The decision every reader makes (``read_failure``): a permanent error is the clip's recorded failure, with
    the store's answer first in its message; a transient one is raised (it fails the attempt)."""
    exc = make()
    if answer is None:
        with pytest.raises(type(exc)):
            read_failure("clip", "s3://b/clip.wav", exc)
        return
    failure = read_failure("clip", "s3://b/clip.wav", exc)
    assert failure.stage == "read" and failure.message.startswith(answer + ": "), failure


def test_local_eacces_at_open_fails_the_clip_not_the_attempt(tmp_path):
    """A real EACCES from the kernel (root without CAP_DAC_OVERRIDE, through setpriv): the unreadable file is a
    ``read`` failure of its clip, the other clip of the shard is decoded."""
    if os.geteuid() != 0 or subprocess.run(["setpriv", "--version"], capture_output=True).returncode != 0:
        pytest.skip("needs root and setpriv to drop the capability that bypasses file permissions")
    write_audio(tmp_path / "in" / "a.wav", "wav_pcm16", 16_000, 0.3, seed=1)
    write_audio(tmp_path / "in" / "b.wav", "wav_pcm16", 16_000, 0.3, seed=2)
    (tmp_path / "in" / "a.wav").chmod(0)
    script = textwrap.dedent(f"""
        import json
        from pipeline.prepare import prepare_shard
        from pipeline.sources import discover_shards
        [shard] = discover_shards({str(tmp_path / "in")!r}, files_per_shard=8)
        clips, failures = prepare_shard(shard)
        print(json.dumps([[c.clip_id for c in clips], [[f.clip_id, f.stage, f.error_class, f.message]
                                                       for f in failures]]))
    """)
    dropped = "-dac_override,-dac_read_search"
    result = subprocess.run(["setpriv", f"--inh-caps={dropped}", f"--bounding-set={dropped}", sys.executable, "-c",
                             script], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    clips, failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert clips == ["b.wav"]
    assert [(f[0], f[1], f[2]) for f in failures] == [("a.wav", "read", "PermissionError")]
    assert "Errno 13" in failures[0][3]


def test_the_retry_window_bounds_a_call_in_an_outage(s3_server, s3_url, fault_proxy):
    """Every request answered 503 SlowDown: one call makes at most 2 x 2 requests (botocore's attempts times s3fs's
    retries; with their defaults, up to 5 x 5), so a retry window of 3 s gives up within a few seconds of it."""
    proxy, options = fault_proxy(every_s=1000, outage_s=1000, mode="503")
    fs, path = storage.get_fs(f"{s3_url}/x.json", options)
    proxy.set_faults(True)
    started = time.monotonic()
    with pytest.raises(retry.StorageUnavailable):
        retry.call(fs.cat_file, path, what="read", retry=retry.RetryPolicy(outage_s=0))
    assert proxy.stats["requests"] <= 4 and time.monotonic() - started < 5, proxy.stats
    started = time.monotonic()
    with pytest.raises(retry.StorageUnavailable):
        retry.call(fs.cat_file, path, what="read", retry=retry.RetryPolicy(outage_s=3, base_s=0.2, max_delay_s=1))
    assert 3 <= time.monotonic() - started < 3 + 5


def test_a_failed_multipart_upload_is_aborted(s3_server, s3_url, fault_proxy, tmp_path):
    """A file large enough for a multipart upload whose parts are refused: no upload is left open (s3fs aborts it;
    what a kill leaves is for the bucket's AbortIncompleteMultipartUpload rule) and the write says the output
    cannot be written."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(100 * 2**20)  # two of s3fs's 50 MiB parts (sparse: nothing is written here)
    created = []
    _, options = fault_proxy(
        answer=lambda method, path: (403, "AccessDenied") if method == "PUT" and "uploadId=" in path else None,
        on_request=lambda method, path, status: created.append(path) if method == "POST" and "?uploads" in path
        else None)
    url = f"{s3_url}/big.bin"
    with pytest.raises(retry.OutputUnwritable, match="AccessDenied"):
        storage.atomic_put_file(str(big), url, options)
    fs = fsspec.filesystem("s3", **s3_server["storage_options"])
    key = url.removeprefix(f"s3://{s3_server['bucket']}/")
    assert created and not [u for u in fs.list_multipart_uploads(s3_server["bucket"]) if u["Key"] == key]
    assert not fs.exists(url)
