"""Audit anchors: the AnchorStore contract (memory, and S3 with Object Lock on LocalStack)
and what anchoring adds to the sealed audit chain — a rolled-back database, or a log
rewritten by someone holding the sealing key, verifies by itself but not against the
latest anchor."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from archive_kms import clients
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ConfigurationError, IntegrityError
from archive_kms.state.anchors import AuditAnchor, MemoryAnchorStore, log_id, publish_anchor, verify_with_anchor
from archive_kms.state.anchors_s3 import S3AnchorStore
from archive_kms.state.audit import HmacHeadSealer
from archive_kms.state.port import AuditEvent
from archive_kms.state.sql import open_state

H = "ab" * 32
LOG = "0f" * 32


@pytest.fixture(params=["memory", "s3"])
def anchor_store(request):
    if request.param == "memory":
        yield MemoryAnchorStore()
        return
    settings = request.getfixturevalue("localstack")
    s3 = clients.aws_client("s3", settings)
    # a fresh bucket per test: locked objects cannot be cleaned up, so names are never reused
    yield S3AnchorStore(s3, f"akms-anchors-test-{uuid.uuid4().hex[:12]}", retention_days=1)


def test_latest_is_the_highest_count_and_an_anchor_is_write_once(anchor_store) -> None:
    assert anchor_store.latest(LOG) is None
    now = datetime.now(UTC)
    for count in (3, 12, 7):
        anchor_store.publish(AuditAnchor(LOG, count, f"{count:02d}" * 32, now))
    anchor_store.publish(AuditAnchor("1e" * 32, 40, H, now))  # another log's anchors are its own
    assert anchor_store.latest(LOG).count == 12
    again = AuditAnchor(LOG, 12, "12" * 32, datetime(2030, 1, 1, tzinfo=UTC))
    anchor_store.publish(again)  # the same anchor again: the first one stands
    latest = anchor_store.latest(LOG)
    assert (latest.count, latest.head_hash, latest.anchored_at) == (12, "12" * 32, now)
    assert anchor_store.latest("1e" * 32).count == 40
    assert [(p.count, p.head_hash) for p in anchor_store.points(LOG)] == [
        (3, "03" * 32),
        (7, "07" * 32),
        (12, "12" * 32),
    ]
    # another anchor of the same count (another history: a fork) is kept beside it, never over it
    anchor_store.publish(AuditAnchor(LOG, 12, H, now))
    assert {p.head_hash for p in anchor_store.points(LOG) if p.count == 12} == {"12" * 32, H}


def test_s3_anchors_cannot_be_deleted_before_their_retention(localstack) -> None:
    s3 = clients.aws_client("s3", localstack)
    bucket = f"akms-anchors-test-{uuid.uuid4().hex[:12]}"
    where = S3AnchorStore(s3, bucket, retention_days=1).publish(AuditAnchor(LOG, 5, H, datetime.now(UTC)))
    key = where.removeprefix(f"s3://{bucket}/")
    version = s3.head_object(Bucket=bucket, Key=key)["VersionId"]
    with pytest.raises(Exception) as info:
        s3.delete_object(Bucket=bucket, Key=key, VersionId=version)
    assert info.value.response["Error"]["Code"] == "AccessDenied"
    retention = s3.get_object_retention(Bucket=bucket, Key=key)["Retention"]
    assert retention["Mode"] == "COMPLIANCE"
    # someone writes a newer version of the same anchor: readers keep the first one
    forged = AuditAnchor(LOG, 5, "cd" * 32, datetime.now(UTC)).to_bytes()
    s3.put_object(Bucket=bucket, Key=key, Body=forged)
    assert S3AnchorStore(s3, bucket, retention_days=1).latest(LOG).head_hash == H


def test_a_bucket_without_object_lock_is_refused(localstack) -> None:
    s3 = clients.aws_client("s3", localstack)
    bucket = f"akms-anchors-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    with pytest.raises(ConfigurationError, match="Object Lock"):
        S3AnchorStore(s3, bucket, retention_days=1).publish(AuditAnchor(LOG, 1, H, datetime.now(UTC)))


# --- what anchoring detects ----------------------------------------------------------------


def _append(state, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        state.append_audit(
            AuditEvent("support:alice", f"step.{i}", ["acme", "beta", None][i % 3], f"run-{i}", {"i": i})
        )


def test_a_restored_backup_verifies_alone_but_not_against_the_anchor(tmp_path: Path) -> None:
    """The attacker restores a copy of the database taken before the anchor: records and
    sealed heads are all genuine, so the chain verifies; the anchor says otherwise."""
    sealer = HmacHeadSealer(SecretBytes.random(32), "k1")
    db, backup = tmp_path / "state.db", tmp_path / "backup.db"
    state = open_state(f"sqlite:///{db}", sealer=sealer)
    _append(state, 5)
    state.close()
    shutil.copy(db, backup)
    state = open_state(f"sqlite:///{db}", sealer=sealer)
    _append(state, 4, start=5)
    anchors = MemoryAnchorStore()
    anchor, _ = publish_anchor(state, anchors)
    assert anchor.count == 9
    v, used = verify_with_anchor(state, anchors)
    assert v.ok and used == anchor
    state.close()

    shutil.copy(backup, db)  # the rollback
    state = open_state(f"sqlite:///{db}", sealer=sealer)
    assert state.verify_audit().ok and state.verify_audit().sealed  # undetectable from inside
    v, _ = verify_with_anchor(state, anchors)
    assert not v.ok and "rolled back" in v.reason
    v, _ = verify_with_anchor(state, anchors, tenant_id="acme")
    assert not v.ok
    state.close()


def test_a_log_rewritten_and_resealed_with_the_key_fails_against_the_anchor(open_state_store, audit_tamper) -> None:
    """The sealing key is stolen: the attacker edits a record, re-hashes and reseals."""
    sealer = HmacHeadSealer(SecretBytes.random(32), "k1")
    state = open_state_store(sealer=sealer)
    tamper = type(audit_tamper)(state)
    _append(state, 6)
    anchors = MemoryAnchorStore()
    publish_anchor(state, anchors)
    _append(state, 2, start=6)
    assert verify_with_anchor(state, anchors)[0].ok  # growth past the anchor is fine

    tamper.edit_details(3, {"i": "forged"})
    tamper.rehash_from(3)
    state.reseal_audit_heads()
    assert state.verify_audit().ok  # the stolen key makes it verify
    v, _ = verify_with_anchor(state, anchors)
    assert not v.ok and v.first_bad_seq == 6 and "rewritten" in v.reason


def test_a_broken_log_is_never_anchored(open_state_store, audit_tamper) -> None:
    state = open_state_store()
    tamper = type(audit_tamper)(state)
    _append(state, 4)
    tamper.edit_details(2, {"i": "forged"})
    anchors = MemoryAnchorStore()
    with pytest.raises(IntegrityError, match="not anchored"):
        publish_anchor(state, anchors)
    assert anchors.latest(log_id(state)) is None


# --- anchors chain, and a log that does not continue them is refused (issue 11 finding 2) ---


def test_anchors_chain_are_signed_and_a_restored_log_is_refused_and_fails_verification(
    tmp_path: Path, anchor_store
) -> None:
    from archive_kms.crypto.signing import Signer
    from archive_kms.errors import AuditForkError
    from archive_kms.state.anchors import check_latest_anchor

    signer = Signer.generate()
    db, backup = tmp_path / "state.db", tmp_path / "backup.db"
    state = open_state(f"sqlite:///{db}")
    _append(state, 5)
    first, _ = publish_anchor(state, anchor_store, signer=signer, alarms=state)
    assert first.prev is None and first.signature_problem(signer.verifier()) is None
    state.close()
    shutil.copy(db, backup)
    state = open_state(f"sqlite:///{db}")
    _append(state, 4, start=5)
    second, _ = publish_anchor(state, anchor_store, signer=signer, alarms=state)
    assert second.prev == (first.count, first.head_hash)
    assert publish_anchor(state, anchor_store, signer=signer)[0] == second  # nothing new: the same anchor
    assert verify_with_anchor(state, anchor_store, verifier=signer.verifier())[0].ok
    state.close()

    shutil.copy(backup, db)  # a whole-database restore to before the second anchor
    state = open_state(f"sqlite:///{db}")
    _append(state, 7, start=100)  # ... and the restored log grows past the anchored count
    with pytest.raises(AuditForkError, match="does not continue the latest anchor"):
        publish_anchor(state, anchor_store, signer=signer, alarms=state)
    assert [r.action for r in state.iter_audit()][-1] == "alarm.audit_fork"
    assert anchor_store.latest(log_id(state)) == second  # nothing anchored over it
    with pytest.raises(AuditForkError, match="does not hold its latest anchor"):
        check_latest_anchor(state, anchor_store, alarms=state)
    v, _ = verify_with_anchor(state, anchor_store, verifier=signer.verifier())
    assert not v.ok and "another hash" in v.reason

    # Someone who can write the bucket adds an anchor matching the restored log above the
    # real ones: publishing would continue it, but verification walks every anchor.
    total = state.verify_audit().records
    last = next(iter(state.iter_audit(after_seq=total - 1)))
    forged = AuditAnchor(log_id(state), total, last.hash, datetime.now(UTC), prev=(second.count, second.head_hash))
    anchor_store.publish(forged)
    v, latest = verify_with_anchor(state, anchor_store, verifier=signer.verifier())
    assert latest == forged and not v.ok and "another hash" in v.reason

    # ... and the keychain's check and the next publish look past anchors the platform did
    # not sign (format 2 unsigned, or format 1 above signed ones): the restored log is
    # still refused; an anchor nobody signed cannot vouch for it.
    legacy = AuditAnchor(
        log_id(state), total + 1, last.hash, datetime.now(UTC), format="archive_kms.audit.anchor/1"
    )  # the hash does not matter for the store: it files by name
    anchor_store.publish(legacy)
    with pytest.raises(AuditForkError, match="does not hold its latest anchor"):
        check_latest_anchor(state, anchor_store, alarms=state, verifier=signer.verifier())
    with pytest.raises(AuditForkError):
        publish_anchor(state, anchor_store, signer=signer, alarms=state)
    state.close()


def test_unsigned_anchors_above_the_signed_ones_do_not_lock_an_intact_log(tmp_path: Path, anchor_store) -> None:
    """A bucket writer's anchor that does not match the log makes `audit verify` fail (a
    false alarm) but does not lock every keychain: the keychain's check uses the latest
    anchor the platform signed."""
    from archive_kms.crypto.signing import Signer
    from archive_kms.state.anchors import check_latest_anchor

    signer = Signer.generate()
    state = open_state(f"sqlite:///{tmp_path / 'state.db'}")
    _append(state, 5)
    real, _ = publish_anchor(state, anchor_store, signer=signer, alarms=state)
    anchor_store.publish(AuditAnchor(real.log_id, 50, H, datetime.now(UTC), prev=real.point))
    assert check_latest_anchor(state, anchor_store, alarms=state, verifier=signer.verifier()) == real
    assert not verify_with_anchor(state, anchor_store, verifier=signer.verifier())[0].ok
    state.close()
