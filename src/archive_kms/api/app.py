"""The console REST API (FastAPI) and the page it serves.

``create_app(console)`` builds the application around a ``Console`` (the platform, the
console store, the run launcher, the token keys, a clock). ``console_from_settings``
is the composition used by ``archive-kms console serve``. Endpoints, roles and the
dual-control rules are listed in ``docs/console-api.md``.

Rules every endpoint follows:

- A bearer token (``api.auth``) on every ``/api`` route but ``/api/health``; 401 without a
  valid one, 429 once a client has sent too many bad ones (``Retry-After``).
- Another tenant's tenant, run or approval request is 404 (as if it did not exist); a
  role without the permission is 403.
- Bad input is 422 naming the field; conflicts (a failed run in the way, a lease held)
  409; the orchestrator or a backing service down 503. Every error body is
  ``{"error": kind, "detail": one line}``: never a stack trace, never key material.
- Record plaintext is never served: there is no read or search endpoint.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from archive_kms.api import models as m
from archive_kms.api import revocation_actions as _revocation_actions  # noqa: F401 - registers revoke, restore, stored warnings
from archive_kms.api import rotation_actions as _rotation_actions  # noqa: F401 - registers erase, rotation confirm, rotation warnings
from archive_kms.api.actions import TenantAction, registered_actions
from archive_kms.api.auth import AuthError, Permission, Principal, TokenKeys, authenticate
from archive_kms.api.warnings import (
    AlarmWarnings,
    KeyStateProbe,
    KeyStateWarnings,
    RunWarnings,
    WarningSource,
    collect,
    warning_sources,
)
from archive_kms.errors import (
    ArchiveKmsError,
    ConfigurationError,
    KeyError_,
    LeaseHeldError,
    ServiceUnavailableError,
    StateError,
    ValidationError,
)
from archive_kms.migration.launch import RunLauncher, Started
from archive_kms.operations.platform import Platform
from archive_kms.state.console import ApprovalRequest, ApprovalState, ConsoleStore
from archive_kms.state.port import AuditEvent, RunState
from archive_kms.state.sql import SqlStateStore

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).resolve().parent / "page"
#: Distinct people (the requester included) a dual-control action needs.
APPROVERS_NEEDED = 2
MAX_AUDIT_UPLOAD_BYTES = 20 * 1024 * 1024


@dataclass
class Console:
    """Everything the API works with, built once per process (``console_from_settings``)."""

    platform: Platform
    store: ConsoleStore
    launcher: RunLauncher
    keys: TokenKeys
    audit_verifier: Any = None  # crypto.signing.Verifier of the platform signing key (audit head seals)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    approval_ttl: timedelta = timedelta(hours=1)
    auth_failure_limit: int = 10
    auth_failure_window: timedelta = timedelta(minutes=1)
    probe: KeyStateProbe = field(default_factory=KeyStateProbe)
    warning_sources: list[WarningSource] = field(default_factory=list)
    flow_run_url: Callable[[str], str | None] = field(default=lambda flow_run_id: None)

    def __post_init__(self) -> None:
        if not self.warning_sources:
            # the built-in sources, then every registered one (the key lifecycle's rotations)
            self.warning_sources = [
                RunWarnings(self.clock),
                KeyStateWarnings(self.probe),
                AlarmWarnings(),
                *warning_sources(),
            ]


class ApiError(Exception):
    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"unknown {what}")


def _forbidden(principal: Principal, doing: str) -> ApiError:
    return ApiError(403, "forbidden", f"role {principal.role.value} may not {doing}")


def _error_for(exc: ArchiveKmsError) -> ApiError:
    """Our errors -> HTTP, by type; the message is already one line without secrets."""
    text = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
    if isinstance(exc, AuthError):
        return ApiError(401, "unauthorized", text, {"WWW-Authenticate": "Bearer"})
    if isinstance(exc, ValidationError):
        return ApiError(422, "validation", text)
    if isinstance(exc, LeaseHeldError):
        return ApiError(409, "conflict", text)
    if isinstance(exc, StateError):
        if text.startswith("unknown "):
            return ApiError(404, "not_found", text)
        return ApiError(409, "conflict", text)
    if isinstance(exc, KeyError_):
        return ApiError(409, "key_unavailable", text)
    if isinstance(exc, (ServiceUnavailableError, ConfigurationError)):
        return ApiError(503, "unavailable", text)
    return ApiError(409, "refused", text)


_ERRORS = {
    400: {"model": m.ErrorOut, "description": "The body is not JSON"},
    401: {"model": m.ErrorOut, "description": "No or bad bearer token"},
    403: {"model": m.ErrorOut, "description": "The role may not do this"},
    404: {"model": m.ErrorOut, "description": "Unknown (or another tenant's) id"},
    409: {"model": m.ErrorOut, "description": "Refused in the current state"},
    413: {"model": m.ErrorOut, "description": "The body is too large"},
    415: {"model": m.ErrorOut, "description": "The body is not of the media type the operation takes"},
    422: {"model": m.ErrorOut, "description": "Invalid input; the detail names the field"},
    429: {"model": m.ErrorOut, "description": "Too many bad tokens from this client"},
    503: {"model": m.ErrorOut, "description": "The orchestrator or a backing service is not available"},
}


def create_app(console: Console) -> FastAPI:
    app = FastAPI(
        title="archive_kms console API",
        version="1",
        description="Tenants, warnings, runs, approvals (dual control) and the audit log. See docs/console-api.md.",
        openapi_url="/api/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    bearer = HTTPBearer(auto_error=False, description="A console token (`archive-kms console token`)")
    actions = registered_actions()

    # --- errors ---------------------------------------------------------------------------

    def _json_error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _json_error(exc.status, exc.kind, exc.detail, exc.headers)

    @app.exception_handler(ArchiveKmsError)
    async def _domain_error(request: Request, exc: ArchiveKmsError) -> JSONResponse:
        e = _error_for(exc)
        return _json_error(e.status, e.kind, e.detail, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            # A body that is not JSON at all is malformed (400), not a field that fails validation.
            return _json_error(400, "malformed", "the request body is not JSON (Content-Type: application/json)")
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return _json_error(422, "validation", "; ".join(parts)[:1000])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {400: "malformed", 404: "not_found", 405: "method_not_allowed"}
        headers = getattr(exc, "headers", None)  # e.g. Allow on 405
        return _json_error(exc.status_code, kinds.get(exc.status_code, "http"), str(exc.detail)[:300], headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        reference = uuid.uuid4().hex[:12]
        log.error("console API: unexpected %s (reference %s)", type(exc).__name__, reference)
        return _json_error(500, "internal", f"internal error (reference {reference}; see the console log)")

    # --- who is calling ---------------------------------------------------------------------

    def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        client = request.client.host if request.client else "unknown"
        now = console.clock()
        window = console.auth_failure_window
        if console.store.auth_failures(client, now=now, window=window) >= console.auth_failure_limit:
            raise ApiError(
                429,
                "rate_limited",
                "too many bad tokens from this client; wait and retry",
                {"Retry-After": str(int(window.total_seconds()))},
            )
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ApiError(
                401, "unauthorized", "missing bearer token (Authorization: Bearer ...)", {"WWW-Authenticate": "Bearer"}
            )
        try:
            return authenticate(console.keys, credentials.credentials)
        except AuthError as exc:
            console.store.record_auth_failure(client, now=now, window=window)
            log.warning("console API: rejected a bearer token from %s: %s", client, exc)
            raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"}) from None

    def require(p: Principal, permission: Permission, doing: str) -> None:
        if not p.can(permission):
            raise _forbidden(p, doing)

    def tenant_of(p: Principal, tenant_id: str) -> Any:
        from archive_kms.domain.tenants import TenantId

        try:
            tid = TenantId(tenant_id).value
        except ValidationError:
            raise _not_found("tenant") from None
        t = console.platform.state.get_tenant(tid)
        if t is None or not p.sees(tid):
            raise _not_found("tenant")
        return t

    def run_of(p: Principal, run_id: str) -> Any:
        run = console.platform.state.get_run(run_id) if len(run_id) <= 64 else None
        if run is None or not p.sees(run.tenant_id):
            raise _not_found("run")
        return run

    def request_of(p: Principal, request_id: str) -> ApprovalRequest:
        found = console.store.get_request(request_id) if len(request_id) <= 64 else None
        if found is None or not p.sees(found.tenant_id):
            raise _not_found("approval request")
        return found

    def audit(
        p: Principal | str, action: str, tenant_id: str | None, run_id: str | None, details: dict[str, Any]
    ) -> None:
        actor = p.actor if isinstance(p, Principal) else p
        console.platform.state.append_audit(
            AuditEvent(actor=actor, action=action, tenant_id=tenant_id, run_id=run_id, details=details)
        )

    # --- views ------------------------------------------------------------------------------

    def started_out(s: Started) -> dict[str, Any]:
        return {**s.to_dict(), "progress_url": f"/api/runs/{s.run_id}", "page_url": f"/#run={s.run_id}"}

    def approval_out(r: ApprovalRequest) -> dict[str, Any]:
        return {
            "request_id": r.request_id,
            "tenant": r.tenant_id,
            "action": r.action,
            "params": dict(r.params),
            "requested_by": r.requested_by,
            "reason": r.reason,
            "created_at": r.created_at.isoformat(timespec="seconds"),
            "expires_at": r.expires_at.isoformat(timespec="seconds"),
            "state": r.state.value,
            "votes": [{"voter": v.voter, "role": v.role, "at": v.at.isoformat(timespec="seconds")} for v in r.votes],
            "approvals_needed": max(0, APPROVERS_NEEDED - len(r.voters)) if r.state is ApprovalState.PENDING else 0,
            "run_id": r.run_id,
            "error": r.error,
        }

    def run_row(run: Any) -> dict[str, Any]:
        from archive_kms.migration.report import progress

        current = next((s.name for s in run.steps if s.state.value not in ("completed", "skipped")), None)
        return {
            "run_id": run.run_id,
            "tenant": run.tenant_id,
            "flow": run.flow.value,
            "mode": run.mode,
            "state": run.state.value,
            "created_at": run.created_at.isoformat(timespec="seconds"),
            "updated_at": run.updated_at.isoformat(timespec="seconds"),
            "current_step": current,
            "progress": progress(console.platform, run),
        }

    def tenant_out(p: Principal, t: Any) -> dict[str, Any]:
        platform = console.platform
        gate = platform.state.gate(t.tenant_id)
        active = platform.state.find_active_run(t.tenant_id)
        return {
            "tenant": t.tenant_id,
            "key_mode": t.key_mode.value,
            "key_ref": t.key_ref,
            "key_state": console.probe.state(platform, t).to_dict(),
            "location": platform.location_of(t.tenant_id).uri,
            "gate": {"state": gate.state.value, "pending": gate.pending},
            "index": platform.index.current_index(t.tenant_id),
            "index_generation": t.index_generation,
            "active_run": active.run_id if active else None,
            "actions": sorted(a.name for a in actions.values() if p.can(a.permission)),
        }

    # --- routes: health, me -------------------------------------------------------------------

    @app.get("/api/health", response_model=m.Health, tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/me", response_model=m.Me, responses=_ERRORS, tags=["meta"])
    def me(p: Principal = Depends(principal)) -> dict[str, Any]:
        return p.to_dict()

    # --- tenants ---------------------------------------------------------------------------

    @app.get("/api/tenants", response_model=list[m.TenantOut], responses=_ERRORS, tags=["tenants"])
    def list_tenants(p: Principal = Depends(principal)) -> list[dict[str, Any]]:
        require(p, Permission.READ, "read tenants")
        return [tenant_out(p, t) for t in console.platform.state.list_tenants() if p.sees(t.tenant_id)]

    @app.get("/api/tenants/{tenant}", response_model=m.TenantOut, responses=_ERRORS, tags=["tenants"])
    def get_tenant(tenant: str, p: Principal = Depends(principal)) -> dict[str, Any]:
        t = tenant_of(p, tenant)
        require(p, Permission.READ, "read tenants")
        return tenant_out(p, t)

    @app.get("/api/tenants/{tenant}/blast-radius", response_model=m.BlastRadiusOut, responses=_ERRORS, tags=["tenants"])
    def blast_radius(
        tenant: str,
        action: str = Query(..., min_length=1, max_length=32, description="The action to preview (remove, ...)"),
        p: Principal = Depends(principal),
    ) -> dict[str, Any]:
        from archive_kms.operations.blast_radius import blast_radius as preview

        t = tenant_of(p, tenant)
        found = actions.get(action)
        if found is None or found.dry_run is None:
            previewable = sorted(a.name for a in actions.values() if a.dry_run)
            raise ApiError(422, "validation", f"action: one of {', '.join(previewable)}")
        require(p, found.permission, f"preview {action}")
        return preview(console.platform, t.tenant_id, found.dry_run).to_dict()

    def _register_action_route(action: TenantAction) -> None:
        body_model = action.body

        def endpoint(tenant: str, body: body_model, p: Principal = Depends(principal)) -> dict[str, Any]:  # type: ignore[valid-type]
            t = tenant_of(p, tenant)
            require(p, action.permission, f"{action.name} tenants")
            if action.dual_control:
                return request_approval(p, action, t.tenant_id, body)
            started = action.start(console, p, t.tenant_id, body, p.actor)
            return {"status": "started" if started.created else "already_running", "run": started_out(started)}

        endpoint.__annotations__["body"] = body_model  # a per-action model (annotations are strings here)
        app.add_api_route(
            f"/api/tenants/{{tenant}}/{action.name}",
            endpoint,
            methods=["POST"],
            response_model=m.ActionOut,
            responses=_ERRORS,
            status_code=202,
            summary=action.summary,
            tags=["actions"],
            name=f"action_{action.name}",
        )

    def request_approval(p: Principal, action: TenantAction, tenant_id: str, body: Any) -> dict[str, Any]:
        if action.check is not None:
            action.check(console, tenant_id, body)  # refuse now what the run would refuse
        params = body.model_dump(mode="json")
        reason = params.get("reason") or action.name
        created = console.store.create_request(
            tenant_id=tenant_id,
            action=action.name,
            params=params,
            requested_by=p.subject,
            role=p.role.value,
            reason=reason,
            now=console.clock(),
            ttl=console.approval_ttl,
        )
        audit(
            p,
            "approval.request",
            tenant_id,
            None,
            {
                "request": created.request_id,
                "action": action.name,
                "params": params,
                "expires_at": created.expires_at.isoformat(),
            },
        )
        return {"status": "approval_required", "approval": approval_out(created)}

    for _action in actions.values():
        _register_action_route(_action)

    # --- warnings ---------------------------------------------------------------------------

    @app.get("/api/warnings", response_model=list[m.WarningOut], responses=_ERRORS, tags=["warnings"])
    def warnings(
        tenant: str | None = Query(None, max_length=128), p: Principal = Depends(principal)
    ) -> list[dict[str, Any]]:
        require(p, Permission.READ, "read warnings")
        if tenant is not None:
            tenants = [tenant_of(p, tenant)]
        else:
            tenants = [t for t in console.platform.state.list_tenants() if p.sees(t.tenant_id)]
        return [w.to_dict() for w in collect(console.platform, tenants, console.warning_sources)]

    # --- runs -------------------------------------------------------------------------------

    @app.get("/api/runs", response_model=list[m.RunRow], responses=_ERRORS, tags=["runs"])
    def list_runs(
        tenant: str | None = Query(None, max_length=128),
        state: RunState | None = None,
        limit: int = Query(50, ge=1, le=500),
        p: Principal = Depends(principal),
    ) -> list[dict[str, Any]]:
        require(p, Permission.READ, "read runs")
        if tenant is not None:
            scope: str | None = tenant_of(p, tenant).tenant_id
        else:
            scope = p.tenant_id
        runs = console.platform.state.list_runs(scope, states=[state] if state else None, limit=limit)
        return [run_row(r) for r in runs if p.sees(r.tenant_id)]

    @app.get("/api/runs/{run_id}", response_model=m.RunOut, responses=_ERRORS, tags=["runs"])
    def get_run(run_id: str, p: Principal = Depends(principal)) -> dict[str, Any]:
        from archive_kms.migration import build_report

        run = run_of(p, run_id)
        require(p, Permission.READ, "read runs")
        report = build_report(console.platform, run.run_id)
        launches = []
        try:
            for launch in console.launcher.launches(run.run_id):
                launches.append({**launch.__dict__, "url": console.flow_run_url(launch.flow_run_id)})
        except ArchiveKmsError as exc:
            log.warning("console API: cannot read flow runs of %s: %s", run.run_id, exc)
        return {
            **run_row(run),
            "steps": report["steps"],
            "report": {k: v for k, v in report.items() if k not in ("steps", "progress")},
            "launches": launches,
            "links": {"self": f"/api/runs/{run.run_id}", "page": f"/#run={run.run_id}"},
        }

    def _support(
        run_id: str, action: str, p: Principal, body: m.TakeoverBody, from_step: str | None = None
    ) -> dict[str, Any]:
        from archive_kms.migration.launch import start_support

        run = run_of(p, run_id)
        require(p, Permission.SUPPORT, f"{action} runs")
        started = start_support(
            console.platform,
            console.launcher,
            run.run_id,
            action,
            actor=p.actor,
            from_step=from_step,
            takeover=body.takeover,
        )
        return {"status": "started" if started.created else "nothing_to_do", "run": started_out(started)}

    @app.post(
        "/api/runs/{run_id}/resume", response_model=m.ActionOut, responses=_ERRORS, status_code=202, tags=["runs"]
    )
    def resume_run(run_id: str, body: m.TakeoverBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        return _support(run_id, "resume", p, body)

    @app.post("/api/runs/{run_id}/rerun", response_model=m.ActionOut, responses=_ERRORS, status_code=202, tags=["runs"])
    def rerun_run(run_id: str, body: m.RerunBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        return _support(run_id, "rerun", p, body, from_step=body.from_step.value)

    @app.post(
        "/api/runs/{run_id}/cancel", response_model=m.ActionOut, responses=_ERRORS, status_code=202, tags=["runs"]
    )
    def cancel_run(run_id: str, body: m.TakeoverBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        return _support(run_id, "cancel", p, body)

    @app.post("/api/runs/{run_id}/waive", response_model=m.WaiveOut, responses=_ERRORS, tags=["runs"])
    def waive_run(run_id: str, body: m.WaiveBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        from archive_kms.migration import waive

        run = run_of(p, run_id)
        require(p, Permission.SUPPORT, "waive quarantined objects")
        for i, name in enumerate(body.objects):
            if not name or len(name.encode("utf-8")) > 1024:
                raise ApiError(422, "validation", f"objects.{i}: 1..1024 bytes of UTF-8")
        out = waive(
            console.platform,
            run.run_id,
            reason=body.reason,
            actor=p.actor,
            objects=[n.encode("utf-8") for n in body.objects],
            all_objects=body.all,
            takeover=body.takeover,
        )
        return out.to_dict()

    # --- approvals (dual control) ------------------------------------------------------------

    @app.get("/api/approvals", response_model=list[m.ApprovalOut], responses=_ERRORS, tags=["approvals"])
    def list_approvals(
        tenant: str | None = Query(None, max_length=128),
        state: ApprovalState | None = None,
        limit: int = Query(50, ge=1, le=500),
        p: Principal = Depends(principal),
    ) -> list[dict[str, Any]]:
        require(p, Permission.READ, "read approval requests")
        if tenant is not None:
            scope: list[str] | None = [tenant_of(p, tenant).tenant_id]
        else:
            scope = None if p.tenant_id is None else [p.tenant_id]
        expire_due(scope)
        return [approval_out(r) for r in console.store.list_requests(tenant_ids=scope, state=state, limit=limit)]

    def expire_due(scope: list[str] | None) -> None:
        now = console.clock()
        for r in console.store.list_requests(tenant_ids=scope, state=ApprovalState.PENDING, limit=500):
            if r.expired(now):
                console.store.close_request(r.request_id, ApprovalState.EXPIRED, now=now)
                audit("console", "approval.expire", r.tenant_id, None, {"request": r.request_id, "action": r.action})

    @app.get("/api/approvals/{request_id}", response_model=m.ApprovalOut, responses=_ERRORS, tags=["approvals"])
    def get_approval(request_id: str, p: Principal = Depends(principal)) -> dict[str, Any]:
        found = request_of(p, request_id)
        require(p, Permission.READ, "read approval requests")
        return approval_out(found)

    def _decidable(p: Principal, request_id: str) -> tuple[ApprovalRequest, TenantAction]:
        found = request_of(p, request_id)
        action = actions.get(found.action)
        if action is None:
            raise ApiError(409, "conflict", f"action {found.action} is not available in this console")
        require(p, action.permission, f"decide {found.action} requests")
        if found.state is not ApprovalState.PENDING:
            raise ApiError(409, "conflict", f"approval request {found.request_id} is {found.state.value}")
        now = console.clock()
        if found.expired(now):
            console.store.close_request(found.request_id, ApprovalState.EXPIRED, now=now)
            audit(p, "approval.expire", found.tenant_id, None, {"request": found.request_id, "action": found.action})
            raise ApiError(
                409,
                "expired",
                f"approval request {found.request_id} expired at {found.expires_at.isoformat(timespec='seconds')}; "
                "request the action again",
            )
        return found, action

    @app.post("/api/approvals/{request_id}/approve", response_model=m.ActionOut, responses=_ERRORS, tags=["approvals"])
    def approve(request_id: str, body: m.DecisionBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        found, action = _decidable(p, request_id)
        if p.subject in found.voters:
            raise ApiError(
                409,
                "same_approver",
                f"{p.subject} already approved request {found.request_id}: a second, different person must approve",
            )
        voted = console.store.vote(found.request_id, voter=p.subject, role=p.role.value, now=console.clock())
        audit(
            p,
            "approval.approve",
            found.tenant_id,
            None,
            {"request": found.request_id, "action": found.action, "comment": body.comment, "voters": len(voted.voters)},
        )
        if len(voted.voters) < APPROVERS_NEEDED or not console.store.claim_approved(
            found.request_id, now=console.clock()
        ):
            return {"status": "approved", "approval": approval_out(voted)}
        params = action.body.model_validate(found.params)
        actor = f"console:{found.requested_by}+{p.subject}"[:255]
        try:
            started = action.start(console, p, found.tenant_id, params, actor)
        except ArchiveKmsError as exc:
            done = console.store.finish(found.request_id, error=f"{type(exc).__name__}: {exc}")
            audit(p, "approval.fail", found.tenant_id, None, {"request": found.request_id, "error": type(exc).__name__})
            raise _error_for(exc) from None
        done = console.store.finish(found.request_id, run_id=started.run_id)
        audit(
            p,
            "approval.execute",
            found.tenant_id,
            started.run_id,
            {"request": found.request_id, "action": found.action},
        )
        return {
            "status": "started" if started.created else "already_running",
            "run": started_out(started),
            "approval": approval_out(done),
        }

    @app.post("/api/approvals/{request_id}/reject", response_model=m.ApprovalOut, responses=_ERRORS, tags=["approvals"])
    def reject(request_id: str, body: m.DecisionBody, p: Principal = Depends(principal)) -> dict[str, Any]:
        found, _ = _decidable(p, request_id)
        closed = console.store.close_request(found.request_id, ApprovalState.REJECTED, now=console.clock())
        audit(p, "approval.reject", found.tenant_id, None, {"request": found.request_id, "comment": body.comment})
        return approval_out(closed)

    # --- audit log ---------------------------------------------------------------------------

    def audit_scope(p: Principal, tenant: str | None) -> str | None:
        require(p, Permission.AUDIT, "read the audit log")
        if tenant is not None:
            return tenant_of(p, tenant).tenant_id
        if p.tenant_id is not None:
            return p.tenant_id
        return None

    @app.get("/api/audit", response_model=m.AuditPage, responses=_ERRORS, tags=["audit"])
    def audit_records(
        tenant: str | None = Query(None, max_length=128),
        after_seq: int = Query(0, ge=0, le=2**62),
        limit: int = Query(100, ge=1, le=1000),
        p: Principal = Depends(principal),
    ) -> dict[str, Any]:
        scope = audit_scope(p, tenant)
        out = []
        for rec in console.platform.state.iter_audit(tenant_id=scope, after_seq=after_seq, page_size=limit):
            out.append(
                {
                    "seq": rec.seq,
                    "ts": rec.ts.isoformat(),
                    "actor": rec.actor,
                    "action": rec.action,
                    "tenant_id": rec.tenant_id,
                    "run_id": rec.run_id,
                    "details": dict(rec.details),
                    "hash": rec.hash,
                }
            )
            if len(out) >= limit:
                break
        return {"records": out, "next_after_seq": out[-1]["seq"] if len(out) == limit else None}

    @app.get(
        "/api/audit/export",
        responses={**_ERRORS, 200: {"content": {"application/x-ndjson": {}}, "description": "JSONL export"}},
        response_class=StreamingResponse,
        tags=["audit"],
    )
    def audit_export(
        tenant: str | None = Query(None, max_length=128), p: Principal = Depends(principal)
    ) -> StreamingResponse:
        scope = audit_scope(p, tenant)
        audit(p, "audit.export", scope, None, {"scope": scope or "global"})

        def lines() -> Iterator[bytes]:
            for doc in console.platform.state.export_audit(scope):
                yield (json.dumps(doc, sort_keys=True, default=str) + "\n").encode("utf-8")

        name = f"audit-{scope or 'all'}.jsonl"
        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.post(
        "/api/audit/verify",
        response_model=m.AuditVerificationOut,
        responses=_ERRORS,
        tags=["audit"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/x-ndjson": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def audit_verify(request: Request, p: Principal = Depends(principal)) -> dict[str, Any]:
        from archive_kms.state.audit import SignatureHeadVerifier, verify_export

        require(p, Permission.AUDIT, "verify audit exports")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/x-ndjson":
            raise ApiError(415, "unsupported_media_type", "body: send the export as Content-Type application/x-ndjson")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_AUDIT_UPLOAD_BYTES:
                raise ApiError(413, "too_large", f"body: an export of at most {MAX_AUDIT_UPLOAD_BYTES} bytes")

        def refused(reason: str) -> dict[str, Any]:  # the file does not verify: a verdict, not an error
            return {"ok": False, "records": 0, "first_bad_seq": None, "reason": reason, "sealed": False}

        docs = []
        for number, line in enumerate(bytes(body).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                return refused(f"line {number} is not JSON")
            if not isinstance(doc, dict):
                return refused(f"line {number} is not a JSON object")
            docs.append(doc)
        if not docs:
            return refused("empty: upload an audit export (JSONL, as GET /api/audit/export gives)")
        verifier = SignatureHeadVerifier(console.audit_verifier) if console.audit_verifier is not None else None
        try:
            result = verify_export(docs, verifier=verifier)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return refused(f"not an audit export ({type(exc).__name__})")
        return {
            "ok": result.ok,
            "records": result.records,
            "first_bad_seq": result.first_bad_seq,
            "reason": result.reason,
            "sealed": bool(result.sealed),
        }

    @app.get("/api/audit/public-key", response_model=m.PublicKeyOut, responses=_ERRORS, tags=["audit"])
    def audit_public_key(p: Principal = Depends(principal)) -> dict[str, str]:
        require(p, Permission.AUDIT, "read the audit key")
        if console.audit_verifier is None:
            raise ApiError(503, "unavailable", "no platform signing key is configured")
        key_id = console.audit_verifier.primary_key_id  # the key that signs now, not a replaced one
        return {"key_id": key_id, "pem": console.audit_verifier.public_pem(key_id).decode("ascii")}

    # --- the page ------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")
    return app


def console_from_settings(settings: Any = None) -> Console:
    """The console on the configured platform (the composition ``console serve`` uses)."""
    from archive_kms.api.auth import token_keys
    from archive_kms.config import Settings
    from archive_kms.flows.launcher import PrefectLauncher
    from archive_kms.operations.platform import Platform, platform_signer

    s = settings or Settings()
    platform = Platform.from_settings(s)
    if not isinstance(platform.state, SqlStateStore):
        raise ConfigurationError(
            "the console keeps approvals in the state database: set state_url to SQLite or PostgreSQL"
        )
    launcher = PrefectLauncher.from_settings(s)
    return Console(
        platform=platform,
        store=ConsoleStore(platform.state),
        launcher=launcher,
        keys=token_keys(s),
        audit_verifier=platform_signer(s).verifier(),
        approval_ttl=timedelta(seconds=s.console_approval_ttl_seconds),
        auth_failure_limit=s.console_auth_failure_limit,
        auth_failure_window=timedelta(seconds=s.console_auth_failure_window_seconds),
        probe=KeyStateProbe(ttl=s.console_key_probe_ttl_seconds),
        flow_run_url=launcher.flow_run_url,
    )


__all__ = ["APPROVERS_NEEDED", "Console", "console_from_settings", "create_app"]
