"""The key-state monitor: for every tenant on its own key, what its master key's provider
says now, told apart (docs/key-lifecycle.md "The key-state monitor"; ADR 0022).

``check_keys(platform)`` reads each key's state and version from its provider
(``KeyProvider.status()``: AWS KMS ``DescribeKey`` with ``KeyState``,
``CurrentKeyMaterialId`` and imported material's ``ValidTo``; the Key Vault key's current
version, ``enabled``, ``exp``/``nbf``; the KMIP object's ``State``) and classifies it:

* ``ok`` - enabled, at the version the tenant's keychain is known to be on;
* ``rotation`` - enabled, but at another version than the accepted one: the customer
  rotated the key. Recorded, raised as a ``rotation_detected`` warning (details:
  ``tenant``, ``key_ref``, ``previous_version``, ``observed_version``) and handed to
  ``on_rotation_detected(tenant_id, observation)`` once per newly observed version; the
  rotation flow acts on it and calls ``accept_key_version`` when the keychain is on it;
* ``revoked`` - disabled, pending deletion, pending import (BYOK material deleted),
  material expired, revoked at the HSM, gone, or our access withdrawn: the customer took
  the key away. The tenant is revoked as ``archive-kms revoke`` would
  (``operations.revocation``, actor ``monitor``) with a receipt, and a ``key_disabled``
  warning is raised. A tenant already revoked is left as it is;
* ``unreachable`` - the provider did not answer: never a revocation. A
  ``key_unavailable`` warning is raised (cleared when it answers again); what is served
  meanwhile is the tenant's grace policy's business (``keys.keychain.access``).

Each observation is stored (``KeyWatchRepo``; the last one per tenant) unless
``dry_run``, which changes nothing and says what would be done, with the blast radius of
each revocation it would make. Tenants on the platform's managed key are not watched.

The public names are stable for the rotation flow (ADR 0022): ``Classification``,
``KeyObservation``, ``MonitorReport``, ``RotationCallback``, ``check_keys``,
``observe_key``, ``accept_key_version``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from archive_kms.domain.keychain import time_out
from archive_kms.errors import ArchiveKmsError, KeyNotFoundError, StateError, ValidationError
from archive_kms.keys.keychain.access import GracePolicy
from archive_kms.keys.port import KeyState
from archive_kms.operations.key_warnings import clear_warning, raise_warning
from archive_kms.operations.platform import Platform
from archive_kms.state.port import AuditEvent, KeyMode, ObservedKey, WarningKind

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "MONITOR_ACTOR",
    "Classification",
    "KeyObservation",
    "MonitorReport",
    "RotationCallback",
    "accept_key_version",
    "check_keys",
    "key_status",
    "observe_key",
    "set_grace_policy",
]

log = logging.getLogger(__name__)

MONITOR_ACTOR = "monitor"
#: Imported key material that expires within this many days raises ``key_expiring``.
EXPIRY_WARNING_DAYS = 7
UNREACHABLE = "unreachable"


class Classification(str, enum.Enum):
    OK = "ok"
    ROTATION = "rotation"
    REVOKED = "revoked"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class KeyObservation:
    """One look at a tenant's master key and what it means.

    ``state``: a ``KeyState`` value or ``unreachable``; ``key_version``: what the provider
    reports (KMS ``CurrentKeyMaterialId``, the Key Vault version, the KMIP UID);
    ``previous_version``: the version accepted before (None on the first look);
    ``action``: what the monitor did (or, in a dry run, would do)."""

    tenant_id: str
    key_ref: str
    key_mode: str
    classification: Classification
    state: str
    key_version: str | None
    previous_version: str | None
    observed_at: datetime
    expires_at: datetime | None = None
    error: str | None = None
    action: str = "none"
    tenant_revoked: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant_id,
            "key_ref": self.key_ref,
            "key_mode": self.key_mode,
            "classification": self.classification.value,
            "state": self.state,
            "key_version": self.key_version,
            "previous_version": self.previous_version,
            "observed_at": time_out(self.observed_at),
            "expires_at": time_out(self.expires_at),
            "error": self.error,
            "action": self.action,
            "tenant_revoked": self.tenant_revoked,
            "details": dict(self.details),
        }


#: ``on_rotation_detected(tenant_id, observation)``: called once per newly observed version.
RotationCallback = Callable[[str, KeyObservation], None]


@dataclass(frozen=True)
class MonitorReport:
    checked_at: datetime
    dry_run: bool
    observations: list[KeyObservation]

    def count(self, c: Classification) -> int:
        return sum(o.classification is c for o in self.observations)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked_at": time_out(self.checked_at),
            "dry_run": self.dry_run,
            "counts": {c.value: self.count(c) for c in Classification},
            "observations": [o.to_dict() for o in self.observations],
        }


def _now() -> datetime:
    return datetime.now(UTC)


def observe_key(platform: Platform, tenant_id: str) -> KeyObservation:
    """Ask the tenant's master key's provider for its state now and classify it against
    the stored observation; changes nothing."""
    tenant = platform.state.get_tenant(tenant_id)
    if tenant is None:
        raise StateError(f"unknown tenant {tenant_id!r}: see `archive-kms tenant list`", resource=f"tenant:{tenant_id}")
    status = platform.keychain.status(tenant_id)  # the L1 that wraps the tenant key now
    stored = platform.state.get_key_observation(tenant_id)
    accepted = stored.accepted_version if stored is not None and stored.key_ref == status.l1_ref else None
    now = _now()
    base: dict[str, Any] = dict(
        tenant_id=tenant_id,
        key_ref=status.l1_ref,
        key_mode=tenant.key_mode.value,
        previous_version=accepted,
        observed_at=now,
        tenant_revoked=status.revoked,
    )
    try:
        key = platform.resolve_provider(status.l1_ref).status()
    except Exception as exc:  # noqa: BLE001 - status() raises only when it cannot ask: never a revocation
        error = f"{type(exc).__name__}: {exc}"[:300] if isinstance(exc, ArchiveKmsError) else type(exc).__name__
        return KeyObservation(
            **base,
            classification=Classification.UNREACHABLE,
            state=UNREACHABLE,
            key_version=accepted,
            error=error,
        )
    details = dict(key.details)
    if not key.state.usable:
        c = Classification.REVOKED
    elif accepted is not None and key.key_version is not None and key.key_version != accepted:
        c = Classification.ROTATION
    else:
        c = Classification.OK
    return KeyObservation(
        **base,
        classification=c,
        state=key.state.value,
        key_version=key.key_version,
        expires_at=key.expires_at,
        details={k: str(v) for k, v in details.items()},
    )


def _watched(platform: Platform, tenant_id: str | None) -> list[str]:
    if tenant_id is not None:
        t = platform.state.get_tenant(tenant_id)
        if t is None:
            raise StateError(
                f"unknown tenant {tenant_id!r}: see `archive-kms tenant list`", resource=f"tenant:{tenant_id}"
            )
        if t.key_mode is KeyMode.MANAGED:
            raise ValidationError(
                f"tenant {tenant_id} is on the platform's managed key: the monitor watches customer keys only"
            )
        return [tenant_id]
    return [t.tenant_id for t in platform.state.list_tenants() if t.key_mode is not KeyMode.MANAGED]


def check_keys(
    platform: Platform,
    tenant_id: str | None = None,
    *,
    dry_run: bool = False,
    actor: str = MONITOR_ACTOR,
    on_rotation_detected: RotationCallback | None = None,
    revoke: bool = True,
) -> MonitorReport:
    """Look at every watched tenant's master key (or one tenant's) and act on it (see the
    module docstring). ``revoke=False``: record and warn only (a customer-side disable is
    still refused everywhere by the key-state guard; nothing is revoked)."""
    out: list[KeyObservation] = []
    for tid in _watched(platform, tenant_id):
        try:
            obs = observe_key(platform, tid)
        except KeyNotFoundError:
            continue  # no keychain (yet): nothing to watch
        except ArchiveKmsError as exc:
            log.warning("monitor: tenant %s could not be observed: %s", tid, exc)
            obs = KeyObservation(
                tid, "?", "?", Classification.UNREACHABLE, UNREACHABLE, None, None, _now(), error=str(exc)[:300]
            )
            out.append(obs)
            continue
        out.append(_act(platform, obs, dry_run=dry_run, actor=actor, on_rotation=on_rotation_detected, revoke=revoke))
    return MonitorReport(_now(), dry_run, out)


def _act(
    platform: Platform,
    obs: KeyObservation,
    *,
    dry_run: bool,
    actor: str,
    on_rotation: RotationCallback | None,
    revoke: bool,
) -> KeyObservation:
    state, tid = platform.state, obs.tenant_id
    stored = state.get_key_observation(tid)
    if (
        obs.classification is Classification.ROTATION
        and stored is not None
        and stored.key_ref == obs.key_ref
        and stored.accepted_version == obs.key_version
    ):
        # Observed before a rotate run retired the old version, acted on after: the version
        # is accepted now. Acting on the stale look would raise the warning again, put the
        # old version back as the accepted one and open a second rotation of the same change.
        obs = replace(obs, classification=Classification.OK, previous_version=stored.accepted_version)
    c = obs.classification
    action = "none"
    first_unusable = None
    if c is Classification.REVOKED:
        first_unusable = (
            stored.details.get("first_seen_unusable_at")
            if stored is not None and stored.outcome == Classification.REVOKED.value
            else None
        ) or time_out(obs.observed_at)
    if c is Classification.UNREACHABLE:
        since = stored.unreachable_since if stored is not None and stored.unreachable_since else obs.observed_at
        action = f"key_unavailable warning (unreachable since {time_out(since)}); not a revocation"
        if not dry_run:
            raise_warning(
                state,
                tid,
                WarningKind.KEY_UNAVAILABLE,
                f"the key service of tenant {tid} does not answer ({obs.key_ref}: {obs.error}) since "
                f"{time_out(since)}; not a revocation: the tenant's grace policy "
                f"({platform.grace_policy(tid)}) decides what is served meanwhile",
                actor=actor,
                details={"key_ref": obs.key_ref, "since": time_out(since), "error": obs.error},
            )
    else:
        if not dry_run:
            clear_warning(state, tid, WarningKind.KEY_UNAVAILABLE, actor=actor, reason="the key service answers")
    if c is Classification.ROTATION:
        details = {
            "tenant": tid,
            "key_ref": obs.key_ref,
            "previous_version": obs.previous_version,
            "observed_version": obs.key_version,
        }
        action = f"rotation_detected warning ({obs.previous_version} -> {obs.key_version})"
        if not dry_run:
            before = state.get_warning(f"{WarningKind.ROTATION_DETECTED.value}:{tid}")
            notified = (
                before is not None and before.active and before.details.get("observed_version") == obs.key_version
            )
            raise_warning(
                state,
                tid,
                WarningKind.ROTATION_DETECTED,
                f"the customer rotated the master key of tenant {tid} ({obs.key_ref}: {obs.previous_version} -> "
                f"{obs.key_version}); confirm the rotation to re-wrap the tenant key and rebuild the index",
                actor=actor,
                details=details,
            )
            if not notified and on_rotation is not None:
                try:
                    on_rotation(tid, obs)
                    action += "; rotation flow notified"
                except Exception as exc:  # noqa: BLE001 - the warning stands; the callback's failure is reported
                    log.warning("monitor: on_rotation_detected for %s failed: %s", tid, exc)
                    action += f"; notifying the rotation flow failed: {type(exc).__name__}"
    if c is Classification.REVOKED:
        action = _revocation(platform, obs, dry_run=dry_run, actor=actor, revoke=revoke, first_unusable=first_unusable)
    if c is Classification.OK and obs.expires_at is not None:
        left = obs.expires_at - obs.observed_at
        if left < timedelta(days=EXPIRY_WARNING_DAYS) and not dry_run:
            raise_warning(
                state,
                tid,
                "key_expiring",
                f"the imported key material of tenant {tid} ({obs.key_ref}) expires at {time_out(obs.expires_at)}: "
                "import it again with a later expiry, or access ends then",
                actor=actor,
                details={"key_ref": obs.key_ref, "expires_at": time_out(obs.expires_at)},
            )
            action = f"key_expiring warning (expires {time_out(obs.expires_at)})"
    obs = replace(obs, action=action)
    if not dry_run:
        _store(platform, obs, stored, first_unusable)
    return obs


def _revocation(
    platform: Platform, obs: KeyObservation, *, dry_run: bool, actor: str, revoke: bool, first_unusable: str | None
) -> str:
    from archive_kms.operations.revocation import RevocationScope, revocation_preview, revoke_tenant

    tid = obs.tenant_id
    reason = f"the customer's master key {obs.key_ref} is {obs.state} at the provider"
    if obs.tenant_revoked:
        return "tenant already revoked; nothing to do (restore once the key is usable again)"
    if dry_run:
        preview = revocation_preview(platform, tid, RevocationScope(), "revoke")
        return (
            f"would revoke ({reason}): {preview.objects} objects, {preview.index_documents} index documents, "
            f"{preview.queued_jobs} queued jobs, running runs: {', '.join(preview.running_runs) or 'none'}"
        )
    raise_warning(
        platform.state,
        tid,
        WarningKind.KEY_DISABLED,
        f"the master key {obs.key_ref} of tenant {tid} is {obs.state} at the provider (seen at "
        f"{time_out(obs.observed_at)}): the tenant is revoked; `archive-kms restore {tid}` once the key is usable",
        actor=actor,
        details={"key_ref": obs.key_ref, "key_state": obs.state, "first_seen_unusable_at": first_unusable},
    )
    if not revoke:
        return f"key_disabled warning; not revoked (monitor run with revoke off): {reason}"
    receipt = revoke_tenant(
        platform,
        tid,
        actor=actor,
        reason=reason,
        key_state={"state": obs.state, "key_ref": obs.key_ref, "first_seen_unusable_at": first_unusable},
    )
    return f"revoked by run {receipt.run_id} ({reason})"


def _store(platform: Platform, obs: KeyObservation, stored: ObservedKey | None, first_unusable: str | None) -> None:
    # Read again: a rotate run may have accepted a new version while this check acted on
    # the tenant (``accept_key_version``); its accepted version must not be overwritten.
    stored = platform.state.get_key_observation(obs.tenant_id) or stored
    accepted = stored.accepted_version if stored is not None and stored.key_ref == obs.key_ref else None
    if accepted is None and obs.classification is Classification.OK:
        accepted = obs.key_version  # the first look sets the baseline
    unreachable_since = None
    if obs.classification is Classification.UNREACHABLE:
        unreachable_since = (
            stored.unreachable_since if stored is not None and stored.unreachable_since else obs.observed_at
        )
    details: dict[str, Any] = {"action": obs.action[:300]}
    if first_unusable:
        details["first_seen_unusable_at"] = first_unusable
    if obs.error:
        details["error"] = obs.error
    platform.state.record_key_observation(
        ObservedKey(
            tenant_id=obs.tenant_id,
            key_ref=obs.key_ref,
            state=obs.state,
            key_version=obs.key_version,
            accepted_version=accepted,
            outcome=obs.classification.value,
            observed_at=obs.observed_at,
            expires_at=obs.expires_at,
            unreachable_since=unreachable_since,
            details=details,
        )
    )


def accept_key_version(platform: Platform, tenant_id: str, key_version: str, *, actor: str) -> ObservedKey:
    """The tenant's keychain is on ``key_version`` now (the rotation flow calls this once
    it re-wrapped the tenant key): it becomes the accepted version, and the
    ``rotation_detected`` warning is cleared. Audited as ``key.version_accepted``."""
    if not isinstance(key_version, str) or not key_version or len(key_version) > 255:
        raise ValidationError("key_version must be the provider's version (1..255 characters)")
    status = platform.keychain.status(tenant_id)
    stored = platform.state.get_key_observation(tenant_id)
    previous = stored.accepted_version if stored is not None else None
    now = _now()
    obs = ObservedKey(
        tenant_id=tenant_id,
        key_ref=status.l1_ref,
        state=stored.state if stored is not None else KeyState.ENABLED.value,
        key_version=key_version,
        accepted_version=key_version,
        outcome=Classification.OK.value,
        observed_at=stored.observed_at if stored is not None else now,
        expires_at=stored.expires_at if stored is not None else None,
        details={"accepted_by": actor, "accepted_at": time_out(now)},
    )
    platform.state.record_key_observation(obs)
    clear_warning(
        platform.state, tenant_id, WarningKind.ROTATION_DETECTED, actor=actor, reason=f"version {key_version} accepted"
    )
    platform.state.append_audit(
        AuditEvent(
            actor=actor,
            action="key.version_accepted",
            tenant_id=tenant_id,
            details={"key_ref": status.l1_ref, "previous_version": previous, "key_version": key_version},
        )
    )
    return obs


def key_status(platform: Platform, tenant_id: str) -> dict[str, Any]:
    """Everything about the tenant's key in one document (``archive-kms keys status``):
    the keychain (L1, revocation, scoped revocations), the provider's answer now, the
    monitor's last observation, this process's key-state check, the grace policy, and the
    active warnings. Changes nothing."""
    tenant = platform.state.get_tenant(tenant_id)
    if tenant is None:
        raise StateError(f"unknown tenant {tenant_id!r}: see `archive-kms tenant list`", resource=f"tenant:{tenant_id}")
    kc = platform.keychain.status(tenant_id)
    scoped = platform.keychain.scoped_revocations(tenant_id)
    own = platform.state.get_grace_policy(tenant_id)
    stored = platform.state.get_key_observation(tenant_id)
    try:
        now = observe_key(platform, tenant_id).to_dict()
    except ArchiveKmsError as exc:
        now = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {
        "tenant": tenant_id,
        "key_mode": tenant.key_mode.value,
        "key_ref": kc.l1_ref,
        "revoked": kc.revoked,
        "revoked_at": time_out(kc.revoked_at),
        "scoped_revocations": [
            {"workspace": s.workspace_id, "before": time_out(s.before), "revoked_at": time_out(s.revoked_at)}
            for s in scoped
        ],
        "provider_now": now,
        "last_observation": None
        if stored is None
        else {
            "state": stored.state,
            "key_version": stored.key_version,
            "accepted_version": stored.accepted_version,
            "outcome": stored.outcome,
            "observed_at": time_out(stored.observed_at),
            "unreachable_since": time_out(stored.unreachable_since),
            "details": dict(stored.details),
        },
        "grace_policy": str(platform.grace_policy(tenant_id)),
        "grace_policy_source": "tenant" if own is not None else "settings (key_outage_grace)",
        "warnings": [w.to_dict() for w in platform.state.list_warnings(tenant_id)],
    }


def set_grace_policy(platform: Platform, tenant_id: str, policy: str | None, *, actor: str) -> str:
    """Set (or with None reset to the settings' default) the tenant's grace policy for key
    service outages; audited as ``key.grace_policy``. Returns the policy now in force.
    This process uses it at once, other processes within 30 s."""
    text = None if policy is None else str(GracePolicy.parse(policy))
    if platform.state.get_tenant(tenant_id) is None:
        raise StateError(f"unknown tenant {tenant_id!r}: see `archive-kms tenant list`", resource=f"tenant:{tenant_id}")
    previous = str(platform.grace_policy(tenant_id))
    platform.state.set_grace_policy(tenant_id, text, actor=actor)
    now = str(platform.grace_policy(tenant_id))
    guard = getattr(platform.keychain, "key_state_guard", None)
    if guard is not None:
        guard.forget_policy(tenant_id)  # this process at once; others within 30 s
    platform.state.append_audit(
        AuditEvent(
            actor=actor,
            action="key.grace_policy",
            tenant_id=tenant_id,
            details={"previous": previous, "policy": now, "own": text is not None},
        )
    )
    return now
