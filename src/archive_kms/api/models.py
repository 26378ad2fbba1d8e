"""Request and response bodies of the console API (pydantic; they make the OpenAPI document).

Requests forbid unknown fields, bound every string and number, and use enums for every
closed set, so a bad request is refused with 422 naming the field before anything runs.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from archive_kms.migration.flowdef import ALL_STEPS
from archive_kms.migration.plan import EnableMode
from archive_kms.storage import Cloud

StepName = enum.Enum("StepName", {s.upper(): s for s in ALL_STEPS}, type=str)  # type: ignore[misc]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Reason = Field(min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$", description="Why (audited)")
Shards = Field(default=None, ge=1, le=256, description="Copy/verify shards (default 8)")


# --- requests ---------------------------------------------------------------------------------


class EnableBody(Strict):
    mode: EnableMode
    key_ref: str = Field(min_length=8, max_length=2048, description="aws-kms://, azure-kv:// or kmip:// reference")
    cloud: Cloud | None = None
    shards: int | None = Shards


class RemoveBody(Strict):
    reason: str = Reason
    shards: int | None = Shards


class TakeoverBody(Strict):
    takeover: bool = Field(default=False, description="Take the lease from a worker known to be dead")


class RerunBody(TakeoverBody):
    from_step: StepName  # type: ignore[valid-type]


class WaiveBody(Strict):
    reason: str = Reason
    objects: list[str] = Field(default_factory=list, max_length=1000, description="Quarantined object names")
    all: bool = Field(default=False, description="Every quarantined object of the run")
    takeover: bool = False


class DecisionBody(Strict):
    comment: str | None = Field(default=None, min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$")


# --- responses --------------------------------------------------------------------------------


class ErrorOut(BaseModel):
    error: str = Field(description="Machine-readable kind: validation, unauthorized, forbidden, not_found, ...")
    detail: str = Field(description="One line saying what to fix")


class Health(BaseModel):
    status: str


class Me(BaseModel):
    subject: str
    role: str
    tenant: str | None
    permissions: list[str]
    expires_at: str


class KeyStateOut(BaseModel):
    state: str = Field(description="active | revoked | unavailable | unknown")
    detail: str | None
    checked_at: str


class GateOut(BaseModel):
    state: str
    pending: int


class TenantOut(BaseModel):
    tenant: str
    key_mode: str
    key_ref: str | None
    key_state: KeyStateOut
    location: str
    gate: GateOut
    index: str | None
    index_generation: int
    active_run: str | None
    actions: list[str] = Field(description="Actions this caller may start on this tenant")


class WarningOut(BaseModel):
    id: str
    kind: str
    severity: str
    tenant: str
    message: str
    run_id: str | None
    since: str | None
    actions: list[str]
    details: dict[str, Any]


class ProgressOut(BaseModel):
    steps_done: int
    steps: int
    objects: int
    copied: int
    verified: int
    failed: int
    quarantined: int


class StepOut(BaseModel):
    step: str
    state: str
    attempts: int
    seconds: float | None = None
    error: str | None = None


class RunRow(BaseModel):
    run_id: str
    tenant: str
    flow: str
    mode: str
    state: str
    created_at: str
    updated_at: str
    current_step: str | None
    progress: ProgressOut


class LaunchOut(BaseModel):
    flow_run_id: str
    state: str
    terminal: bool
    message: str | None
    url: str | None


class RunOut(RunRow):
    steps: list[StepOut]
    report: dict[str, Any]
    launches: list[LaunchOut]
    links: dict[str, str]


class StartedOut(BaseModel):
    run_id: str
    tenant: str
    flow: str
    action: str
    created: bool
    message: str
    flow_run_id: str | None
    deployment: str | None
    progress_url: str
    page_url: str


class VoteOut(BaseModel):
    voter: str
    role: str
    at: str


class ApprovalOut(BaseModel):
    request_id: str
    tenant: str
    action: str
    params: dict[str, Any]
    requested_by: str
    reason: str
    created_at: str
    expires_at: str
    state: str
    votes: list[VoteOut]
    approvals_needed: int
    run_id: str | None
    error: str | None


class ActionOut(BaseModel):
    """What a tenant action answered: a started run, or an approval request waiting for a
    second approver (dual control)."""

    status: str = Field(description="started | already_running | approval_required | approved")
    run: StartedOut | None = None
    approval: ApprovalOut | None = None


class WaiveOut(BaseModel):
    run_id: str
    tenant: str
    waived: list[str]
    already_waived: list[str]
    remaining: int
    message: str


class BlastRadiusOut(BaseModel):
    tenant: str
    action: str
    location: str
    key_mode: str
    key_ref: str | None
    objects: int
    bytes: int
    index: str | None
    index_documents: int | None
    queued_jobs: int
    running_jobs: int
    running_runs: list[str]
    would: list[str]


class AuditRecordOut(BaseModel):
    seq: int
    ts: str
    actor: str
    action: str
    tenant_id: str | None
    run_id: str | None
    details: dict[str, Any]
    hash: str


class AuditPage(BaseModel):
    records: list[AuditRecordOut]
    next_after_seq: int | None


class AuditVerificationOut(BaseModel):
    ok: bool
    records: int
    first_bad_seq: int | None
    reason: str | None
    sealed: bool = Field(description="Chain head seals were checked with the platform's public key")


class PublicKeyOut(BaseModel):
    key_id: str
    pem: str
