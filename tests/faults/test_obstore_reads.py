"""The S3 read path through obstore (``s3_read_client = "obstore"``, ADR 0043) under the
storage faults that concern a read (faults.md A1, A3) and the S3 errors a GET can meet,
through the fault proxy in front of LocalStack. Writes, listings and deletes stay on
boto3 and are covered by ``test_storage_faults.py``.

obstore retries inside its Rust client, so its backoff sleeps are not Python sleeps:
the proxy's request log (arrival times) is the oracle for "retried with backoff".
"""

from __future__ import annotations

import itertools

import pytest
import test_storage_faults as storage_faults
from fault_proxy import Always, CutResponse, Nth, ops, s3_error
from test_storage_faults import Env, MiB, _s3_env, assert_secret_free, body, check_invariants, put, read_sha, sha

from archive_kms.errors import (
    KeyUnavailableError,
    ObjectChangedError,
    ObjectNotFoundError,
    ServiceUnavailableError,
    StorageError,
    TransientError,
)
from archive_kms.storage.s3 import S3ObjectStore


@pytest.fixture()
def obstore_env(localstack, monkeypatch):
    yield from _s3_env(localstack, monkeypatch, "obstore")


def _reads_through_obstore(env: Env) -> S3ObjectStore:
    store = env.open()
    assert isinstance(store, S3ObjectStore) and store._reads is not None  # the path under test
    return store


def test_a1_obstore_get_throttled_then_served(obstore_env):
    """A GET throttled three times is retried with growing waits and served intact."""
    env = obstore_env
    ledger: dict[bytes, str] = {}
    data = body(b"a1/doc", 300_000)
    put(env.direct, ledger, b"a1/doc", data)
    store = _reads_through_obstore(env)
    env.proxy.set_rules(Nth(ops("GetObject"), env.busy, n=1), Nth(ops("GetObject"), env.busy, n=2))
    assert read_sha(store, b"a1/doc") == sha(data)
    gets = env.proxy.requests("GetObject")
    assert len(env.proxy.faults("GetObject")) == 2 and len(gets) == 3
    assert all(b.at - a.at >= 0.05 for a, b in itertools.pairwise(gets)), "a retry went out without backoff"
    check_invariants(env, ledger)


def test_a1_obstore_get_exhausted_budget_is_retryable_named_and_bounded(obstore_env):
    """Throttled for good: after the same 9 attempts as botocore the caller gets a
    retryable ServiceUnavailableError naming the object, without bytes or credentials."""
    env = obstore_env
    ledger: dict[bytes, str] = {}
    put(env.direct, ledger, b"a1/gone", body(b"a1/gone", 3000))
    store = _reads_through_obstore(env)
    env.proxy.set_rules(Always(ops("GetObject"), env.busy))
    with pytest.raises(ServiceUnavailableError) as exc:
        read_sha(store, b"a1/gone")
    err = exc.value
    assert err.retryable and isinstance(err, TransientError)
    assert env.key_of(b"a1/gone") in str(err)
    assert_secret_free(str(err), repr(err))
    assert len(env.proxy.faults("GetObject")) == env.budget
    env.proxy.set_rules()
    check_invariants(env, ledger)


def test_a3_obstore_get_cut_mid_body_never_yields_a_short_object(obstore_env):
    """faults A3 over the obstore read path: a body cut mid-way resumes with a ranged GET
    conditioned on the ETag; persistent cuts fail retryably and nothing is committed."""
    _reads_through_obstore(obstore_env)
    storage_faults.test_a3_get_cut_mid_body_never_yields_a_short_object(obstore_env)


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (400, "KMS.DisabledException", KeyUnavailableError),
        (403, "KMS.KMSInvalidStateException", KeyUnavailableError),
        (403, "AccessDenied", StorageError),
        (404, "NoSuchBucket", StorageError),
        (404, "NoSuchKey", ObjectNotFoundError),
        (412, "PreconditionFailed", ObjectChangedError),
    ],
)
def test_obstore_get_errors_translate_as_on_boto3(obstore_env, status, code, error):
    """Every S3 error a GET can meet is the same error of ours on both read clients (the
    revocation and erasure flows rely on a refusing SSE-KMS key being KeyUnavailableError)."""
    env = obstore_env
    ledger: dict[bytes, str] = {}
    put(env.direct, ledger, b"err/doc", body(b"err/doc", 2000))
    etag = env.direct.head(b"err/doc").etag
    boto3_store = env.open()
    for store in (_reads_through_obstore(env), _boto3_reads(env)):
        env.proxy.set_rules(Always(ops("GetObject"), s3_error(status, code)))
        with pytest.raises(error) as exc:
            store.open_read(b"err/doc", if_match=etag)
        assert type(exc.value) is error
        assert env.key_of(b"err/doc") in str(exc.value) or (code == "AccessDenied" and env.prefix not in str(exc.value))
        assert_secret_free(str(exc.value), repr(exc.value))
    env.proxy.set_rules()
    del boto3_store
    check_invariants(env, ledger)


def _boto3_reads(env: Env) -> S3ObjectStore:
    store = env.open(reads=None)
    assert isinstance(store, S3ObjectStore) and store._reads is None
    return store


def test_obstore_read_of_a_replaced_object_is_changed_not_mixed(obstore_env):
    """A reader opened on one version, its object replaced mid-read and the body cut:
    the resume (If-Match) fails instead of splicing two versions."""
    env = obstore_env
    ledger: dict[bytes, str] = {}
    data = body(b"mix/doc", 3 * MiB)
    put(env.direct, ledger, b"mix/doc", data)
    store = _reads_through_obstore(env)
    env.proxy.set_rules(Nth(ops("GetObject"), CutResponse(MiB + 7), n=1))
    reader = store.open_read(b"mix/doc")
    first = reader.read(MiB)
    assert first == data[:MiB]
    put(env.direct, ledger, b"mix/doc", body(b"mix/other", 3 * MiB))
    with pytest.raises(TransientError, match="changed during read"):
        reader.read()
    reader.close()
    env.proxy.set_rules()
    check_invariants(env, ledger)
