"""The kinds of run the step engine executes, as one table (``definition(flow)``).

Every flow is an ordered list of named, idempotent steps with checkpoints in the state store
(product.md "Flows"); what differs between them is here, in a ``FlowDefinition`` each:

| flow | steps (point of no return in bold) | module |
|---|---|---|
| enable, remove | preflight … **cutover** … report | ``migration.plan``, ``migration.steps`` |
| rotate | preflight, pause, confirm, prove_key, **rewrap**, build_index, cutover, cleanup_index, resume, retire, report | ``migration.rotate`` |
| erase | preflight, inventory, **unindex**, destroy_keys, delete_objects, verify, record, report | ``migration.erase`` |

The engine (lease, fencing, heartbeat, resume, rerun from a step, cancel, graceful stop,
crash points ``before:<step>`` / ``after:<step>``) is the same for all of them
(docs/adr/0025-one-step-engine-for-every-flow.md). Revoke and restore are short flows
recorded as runs without the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from archive_kms.errors import ValidationError
from archive_kms.migration.cancelling import undo_migration
from archive_kms.migration.context import FlowDefinition, Step
from archive_kms.migration.plan import POINT_OF_NO_RETURN, STEPS, MigrationPlan
from archive_kms.state.port import Flow

__all__ = ["ALL_STEPS", "FLOW_DEFINITIONS", "definition"]


def _migration_steps() -> Mapping[str, Step]:
    from archive_kms.migration.steps import STEP_FUNCTIONS

    return STEP_FUNCTIONS


def _migration(flow: Flow, summary: str) -> FlowDefinition:
    return FlowDefinition(
        flow=flow.value,
        steps=STEPS,
        point_of_no_return=POINT_OF_NO_RETURN,
        plan_from_params=MigrationPlan.from_params,
        step_functions=_migration_steps,
        cancel=undo_migration,
        summary=summary,
        rerun_consequence="move it back",
    )


def _lifecycle() -> dict[str, FlowDefinition]:
    from archive_kms.migration.erase import ERASE_FLOW
    from archive_kms.migration.rotate import ROTATE_FLOW

    return {ERASE_FLOW.flow: ERASE_FLOW, ROTATE_FLOW.flow: ROTATE_FLOW}


FLOW_DEFINITIONS: dict[str, FlowDefinition] = {
    Flow.ENABLE.value: _migration(Flow.ENABLE, "the tenant lives at the destination"),
    Flow.REMOVE.value: _migration(Flow.REMOVE, "the tenant lives at the destination"),
    **_lifecycle(),
}


#: Every step name of every flow, once each, in flow order (the choices of a rerun's
#: "from step" before the run, and so its flow, is known: the Prefect UI, the console API).
ALL_STEPS: tuple[str, ...] = tuple(dict.fromkeys(step for d in FLOW_DEFINITIONS.values() for step in d.steps))


def definition(flow: Flow | str | Any) -> FlowDefinition:
    """The definition of ``flow`` (a ``Flow``, its value, or a plan/run with a ``flow``)."""
    key = getattr(flow, "value", flow)
    if not isinstance(key, str):
        key = getattr(getattr(flow, "flow", None), "value", getattr(flow, "flow", None))
    found = FLOW_DEFINITIONS.get(key) if isinstance(key, str) else None
    if found is None:
        raise ValidationError(
            f"the step engine does not run {key!r} flows (it runs {', '.join(sorted(FLOW_DEFINITIONS))})"
        )
    return found
