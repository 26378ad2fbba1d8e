"""The AWS adapters' contract suites (``tests/contract``), run again on moto's server (a
child process of this test, on a loopback port): seconds, no stack, so a change that
breaks the S3 store or the KMS providers fails the unit tier before the stack tier runs.
The server runs in its own process so that nothing the rest of the session did to
botocore's loaded models reaches moto's request router.

The same test functions run, only the ``backend`` fixture differs. moto does not enforce
key state, so the server-side revocation cases are not collected here: LocalStack stays
the proof for revocation (``tests/contract/test_key_provider_contract.py``)."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from archive_kms import clients
from archive_kms.config import Settings

CONTRACTS = Path(__file__).resolve().parents[1] / "contract"
#: Cases that prove what moto does not do: server-side key state (moto never refuses a
#: disabled key) and a store that recomputes the checksum we send (moto echoes it unchecked).
#: Also the memory bound of a write (the LocalStack run proves it) and stale-upload
#: cleanup (moto lists every upload as initiated in 2010).
#: moto's KMS answers a tampered or foreign ciphertext with AccessDenied (KMS:
#: InvalidCiphertext) and describes keys without KeyUsage/KeySpec, so the cases that tell
#: a wrong key from a denied one, and key status and preflight, need LocalStack too.
NOT_ON_MOTO = {
    "test_server_side_revocation_makes_the_key_unusable",
    "test_tampered_ciphertext_is_wrong_key",
    "test_wrapped_key_of_another_key_is_refused",
    "test_status_enabled",
    "test_preflight_passes",
    "test_write_returns_the_checksum_the_store_validated",
    "test_streamed_40mib_object_keeps_memory_bounded",
    "test_crashed_upload_is_invisible_and_cleaned_up",
}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"moto_{name}", CONTRACTS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cases(module: ModuleType, prefix: str) -> dict[str, object]:
    """Every contract test of ``module`` that takes the ``backend`` fixture (the rest name
    a real service), under ``prefix`` so the two suites' names do not collide."""
    found = {}
    for name, fn in vars(module).items():
        takes_backend = inspect.isfunction(fn) and "backend" in inspect.signature(fn).parameters
        if name.startswith("test_") and name not in NOT_ON_MOTO and takes_backend:
            found[f"test_{prefix}_{name[5:]}"] = fn
    assert found, f"no contract cases found in {module.__name__}"
    return found


store_contract = _load("test_object_store_contract")
key_contract = _load("test_key_provider_contract")
globals().update(_cases(store_contract, "s3_store"))
globals().update(_cases(key_contract, "kms_provider"))


@pytest.fixture(scope="module")
def moto_settings() -> Iterator[Settings]:
    """moto's S3 and KMS on a loopback port of this process; the environment points there
    too, for the subprocesses some cases start (a crash mid-upload)."""
    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host = "127.0.0.1"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"moto's server did not start on {host}:{port} (exit {server.poll()})", pytrace=False)
            time.sleep(0.1)
    env = {
        "ARCHIVE_KMS_AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "ARCHIVE_KMS_AWS_REGION": "us-east-1",
        "ARCHIVE_KMS_AWS_ACCESS_KEY_ID": "testing",
        "ARCHIVE_KMS_AWS_SECRET_ACCESS_KEY": "testing",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield Settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(timeout=10)


@contextlib.contextmanager
def _checksums_echoed() -> Iterator[None]:
    """moto echoes an ``x-amz-checksum-sha256`` only when the request also names the
    algorithm (``x-amz-sdk-checksum-algorithm``); S3 and LocalStack echo it either way.
    Name it on every S3 client built meanwhile, so the adapter's echo check holds."""

    def name_algorithm(request, **_):
        if "x-amz-checksum-sha256" in request.headers and "x-amz-sdk-checksum-algorithm" not in request.headers:
            request.headers["x-amz-sdk-checksum-algorithm"] = "SHA256"

    real = clients.aws_client

    def aws_client(service, *args, **kwargs):
        client = real(service, *args, **kwargs)
        if service == "s3":
            client.meta.events.register("before-sign.s3", name_algorithm)
        return client

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clients, "aws_client", aws_client)
        yield


def pytest_generate_tests(metafunc):
    """S3 for the store cases; AWS KMS and managed keys for the key-provider cases (BYOK
    needs GetParametersForImport, which moto does not serve: LocalStack only)."""
    if "backend" in metafunc.fixturenames:
        kinds = ["s3"] if metafunc.function.__module__ == store_contract.__name__ else ["aws-kms", "managed"]
        metafunc.parametrize("backend", kinds, indirect=True)


@pytest.fixture(scope="module")
def _kms_backends() -> dict[str, object]:
    # No cleanup: the keys go with the server (and moto fails ScheduleKeyDeletion with a 500).
    return {}


@pytest.fixture
def backend(request, moto_settings, _kms_backends):
    if request.param == "s3":
        with _checksums_echoed():
            yield from store_contract._s3_harness(moto_settings)
        return
    if request.param not in _kms_backends:
        _kms_backends[request.param] = {
            "aws-kms": key_contract.AwsKmsBackend,
            "managed": key_contract.ManagedBackend,
        }[request.param](moto_settings)
    yield _kms_backends[request.param]
