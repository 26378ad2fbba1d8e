"""``RunLauncher`` on Prefect: flow runs created from the deployments of ``prefect.yaml``
through the Prefect API (``prefect_api_url``), for a worker of the ``archive-kms`` work
pool to execute. The library's ``migration.launch`` decides what to submit; this module
only talks to Prefect.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from archive_kms.errors import ConfigurationError, ServiceUnavailableError
from archive_kms.migration.launch import Launch, LaunchState

#: Prefect state types that end a flow run.
_TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class PrefectLauncher:
    """Submits to and reads flow runs from the Prefect API at ``api_url``."""

    def __init__(self, api_url: str, *, ui_url: str | None = None) -> None:
        if not api_url:
            raise ConfigurationError(
                "no Prefect API: prefect_api_url is not set (run `archive-kms stack up`, or export "
                "ARCHIVE_KMS_PREFECT_API_URL)"
            )
        self.api_url = api_url.rstrip("/")
        # the UI is served by the same server, at its root
        self.ui_url = ui_url or self.api_url.removesuffix("/api")

    def __repr__(self) -> str:
        return f"PrefectLauncher({self.api_url!r})"

    @classmethod
    def from_settings(cls, settings: Any) -> PrefectLauncher:
        return cls(getattr(settings, "prefect_api_url", None) or os.environ.get("PREFECT_API_URL", ""))

    def _client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def submit(self, deployment: str, parameters: Mapping[str, Any], *, tags: Sequence[str]) -> Launch:
        from prefect.exceptions import ObjectNotFound

        try:
            with self._client() as client:
                try:
                    found = client.read_deployment_by_name(deployment)
                except ObjectNotFound:
                    raise ConfigurationError(
                        f"deployment {deployment} is not on the Prefect server at {self.api_url}: run "
                        "`archive-kms stack up` (it deploys flows/prefect.yaml and starts a worker)",
                        resource=deployment,
                    ) from None
                flow_run = client.create_flow_run_from_deployment(
                    found.id, parameters=dict(parameters), tags=list(tags)
                )
        except (ConfigurationError, ServiceUnavailableError):
            raise
        except Exception as exc:  # noqa: BLE001 - httpx and Prefect client errors: the server does not answer
            raise ServiceUnavailableError(
                f"the Prefect API at {self.api_url} did not accept the flow run ({type(exc).__name__})",
                resource=self.api_url,
            ) from None
        return Launch(str(flow_run.id), deployment)

    def launches(self, run_id: str) -> list[LaunchState]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
        from prefect.client.schemas.sorting import FlowRunSort

        try:
            with self._client() as client:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"run:{run_id}"])),
                    sort=FlowRunSort.START_TIME_DESC,
                    limit=20,
                )
        except Exception as exc:  # noqa: BLE001 - httpx and Prefect client errors: the server does not answer
            raise ServiceUnavailableError(
                f"the Prefect API at {self.api_url} does not answer ({type(exc).__name__})", resource=self.api_url
            ) from None
        runs = sorted(runs, key=lambda r: r.created or r.expected_start_time, reverse=True)
        out = []
        for r in runs:
            kind = r.state.type.value if r.state is not None else "SCHEDULED"
            out.append(
                LaunchState(
                    flow_run_id=str(r.id),
                    state=kind.lower(),
                    terminal=kind in _TERMINAL,
                    message=(r.state.message or None) if r.state is not None else None,
                    created=r.created,
                    state_since=r.state.timestamp if r.state is not None else None,
                    parameters=dict(r.parameters or {}),
                )
            )
        return out

    def mark_crashed(self, flow_run_id: str, message: str) -> None:
        from prefect.states import Crashed

        try:
            with self._client() as client:
                current = client.read_flow_run(flow_run_id).state
                if current is not None and current.type.value in _TERMINAL:
                    return
                client.set_flow_run_state(flow_run_id, Crashed(message=message[:1000]), force=True)
        except Exception as exc:  # noqa: BLE001 - httpx and Prefect client errors: the server does not answer
            raise ServiceUnavailableError(
                f"the Prefect API at {self.api_url} did not take the state of flow run {flow_run_id} "
                f"({type(exc).__name__})",
                resource=self.api_url,
            ) from None

    def flow_run_url(self, flow_run_id: str) -> str:
        return f"{self.ui_url}/runs/flow-run/{flow_run_id}"


__all__ = ["PrefectLauncher"]
