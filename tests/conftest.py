"""Shared pytest fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import mimi


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A small random Mimi checkpoint in the moshi layout, loaded by the tests through the real `load_mimi`."""
    return str(mimi.write_random_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors",
                                            mimi.MimiConfig.tiny()))


# --- s3_server: a local S3 (moto in server mode) for storage tests -------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 with one bucket, for the whole session.

    Yields ``{"endpoint_url", "storage_options", "bucket"}``; ``storage_options`` are the s3fs options that reach
    it (pass them to ``pipeline.storage`` functions). Dummy AWS credentials are set in the environment meanwhile.
    """
    from moto.server import ThreadedMotoServer
    import s3fs

    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint_url = f"http://{host}:{port}"
        storage_options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint_url}}
        bucket = "mimi-test"
        s3fs.S3FileSystem(**storage_options).mkdir(bucket)
        try:
            yield {"endpoint_url": endpoint_url, "storage_options": storage_options, "bucket": bucket}
        finally:
            server.stop()


@pytest.fixture
def s3_url(s3_server: dict[str, Any]) -> str:
    """A fresh, empty ``s3://`` prefix in the test bucket."""
    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}"


@pytest.fixture
def fault_proxy(s3_server: dict[str, Any]):
    """A factory of fault-injecting proxies in front of the S3 server: ``fault_proxy(**FaultProxy options)`` returns
    ``(proxy, storage_options)``, the options reaching the server through the proxy. Stopped after the test."""
    from fault_proxy import FaultProxy

    proxies = []

    def make(**options) -> tuple[FaultProxy, dict[str, Any]]:
        proxy = FaultProxy(s3_server["endpoint_url"], **options).start(faults=False)
        proxies.append(proxy)
        return proxy, {**s3_server["storage_options"], "client_kwargs": {"endpoint_url": proxy.url}}

    yield make
    for proxy in proxies:
        proxy.stop()
