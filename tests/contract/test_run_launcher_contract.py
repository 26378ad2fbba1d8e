"""The ``RunLauncher`` contract (``migration.launch``), held by the Prefect launcher on the
stack's server (its deployments made by the ``worker`` service) and by the recording
launcher the console's unit tests use."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from archive_kms.errors import ConfigurationError
from archive_kms.migration.launch import run_tags

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from console_fixtures import RecordingLauncher

STATES = {"scheduled", "pending", "running", "paused", "completed", "failed", "crashed", "cancelled", "cancelling"}


@pytest.fixture(params=["recording", "prefect"])
def launcher(request):
    if request.param == "recording":
        return RecordingLauncher()
    request.getfixturevalue("worker")
    request.getfixturevalue("prefect_api")
    from archive_kms.flows.launcher import PrefectLauncher

    from archive_kms.config import Settings

    return PrefectLauncher.from_settings(Settings())


def test_an_unknown_deployment_is_a_configuration_error_naming_it(launcher):
    with pytest.raises(ConfigurationError, match="migration-nothing/none"):
        launcher.submit("migration-nothing/none", {}, tags=["archive-kms"])


def test_submissions_are_found_by_their_run_tag_newest_first(launcher):
    run_id = f"run-contract-{uuid.uuid4().hex[:12]}"
    params = {"run_id": run_id, "action": "cancel", "actor": "contract-test"}
    first = launcher.submit("migration-support/support", params, tags=run_tags("acme", run_id))
    second = launcher.submit("migration-support/support", params, tags=run_tags("acme", run_id))
    assert first.deployment == "migration-support/support" and first.flow_run_id != second.flow_run_id
    found = launcher.launches(run_id)
    assert [x.flow_run_id for x in found] == [second.flow_run_id, first.flow_run_id]
    assert all(
        x.state in STATES and x.terminal == (x.state in {"completed", "failed", "crashed", "cancelled"}) for x in found
    )
    assert launcher.launches(f"run-contract-{uuid.uuid4().hex[:12]}") == []


def test_a_launch_says_when_it_was_submitted_and_with_what_and_can_be_marked_crashed(launcher):
    """What reclaiming a run needs (migration.reclaim): the submission time, the state's
    start, the parameters; and marking a lost flow run crashed (terminal), which leaves a
    terminal one as it is."""
    run_id = f"run-contract-{uuid.uuid4().hex[:12]}"
    params = {"run_id": run_id, "action": "cancel", "actor": "contract-test", "task_runner": "threads"}
    lost = launcher.submit("migration-support/support", params, tags=run_tags("acme", run_id))
    (found,) = launcher.launches(run_id)
    assert found.created is not None and found.state_since is not None
    assert found.parameters["run_id"] == run_id and found.parameters["task_runner"] == "threads"
    launcher.mark_crashed(lost.flow_run_id, "executor lost: contract test")
    (found,) = launcher.launches(run_id)
    assert found.state in {"crashed", "completed", "failed"} and found.terminal  # a fast worker may have finished it
    before = found.state
    launcher.mark_crashed(lost.flow_run_id, "again")
    assert launcher.launches(run_id)[0].state == before
