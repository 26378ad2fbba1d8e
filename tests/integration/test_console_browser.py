"""The console page in a real browser: Debian's Chromium driven by Playwright (never
``playwright install``: localstack/system-deps.sh installs the chromium package).

The page is served by uvicorn over real HTTP from the console on the in-memory platform
(tests/unit/console_fixtures.py): ``acme`` on its own key with a failed remove run, and
``globex`` managed with a failed enable run. A tenant admin signs in and sees their tenant,
its warning and its runs, and nothing of globex; a support engineer sees every run with
support actions and no key action. The screenshot of the admin's page is written to
``tmp_path`` (and to ``docs/console.png`` with ARCHIVE_KMS_CONSOLE_SCREENSHOT=1).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "unit"))
from console_fixtures import ACME, CUSTOMER_KEY, GLOBEX, ConsoleHarness  # noqa: E402
from console_server import serving  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _fail_at_preflight(p, plan) -> str:
    from archive_kms.migration import trigger
    from archive_kms.state.port import RunState, StepState

    run, _ = trigger(p, plan, actor="test")
    p.state.update_step(run.run_id, "preflight", StepState.RUNNING)
    p.state.update_step(run.run_id, "preflight", StepState.FAILED, error="KeyUnavailableError: key is disabled")
    p.state.set_run_state(run.run_id, RunState.FAILED)
    return run.run_id


@pytest.fixture
def console(tmp_path):
    from archive_kms.migration import plan_enable, plan_remove

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash localstack/system-deps.sh` (apt-get install chromium)")
    h = ConsoleHarness(tmp_path)
    acme_failed = _fail_at_preflight(h.platform, plan_remove(h.platform, ACME))
    globex_failed = _fail_at_preflight(h.platform, plan_enable(h.platform, GLOBEX, "byokms", CUSTOMER_KEY))
    with serving(h.app) as base:
        yield h, base, acme_failed, globex_failed
    h.close()


@pytest.fixture
def clean_console(tmp_path):
    """The console with no failed run in the way (both tenants settled)."""
    h = ConsoleHarness(tmp_path)
    with serving(h.app) as base:
        yield h, base
    h.close()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def sign_in(browser, base: str, token: str):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(base + "/")
    page.fill("#token", token)
    page.click("#login-button")
    page.wait_for_selector("#tenants tbody tr")
    page.wait_for_selector("#runs tbody tr")
    return page


def message(page) -> str:
    page.wait_for_function("document.querySelector('#message').textContent.length > 0")
    return page.inner_text("#message")


def test_tenant_admin_sees_their_tenant_warnings_and_runs(console, browser, tmp_path):
    h, base, acme_failed, globex_failed = console
    page = sign_in(browser, base, h.token("tenant_admin", sub="alice", tenant=ACME))
    assert page.inner_text("#who") == f"alice · tenant_admin · {ACME}"
    rows = page.locator("#tenants tbody tr")
    assert rows.count() == 1
    row = rows.first
    assert row.get_attribute("data-tenant") == ACME
    assert "byokms" in row.inner_text() and "active" in row.inner_text()
    # the key action a tenant admin may start on a customer-key tenant
    assert row.locator("button[data-action=remove]").is_visible()
    page.wait_for_selector("#warnings li[data-kind=run_failed]")
    warning = page.inner_text("#warnings")
    assert acme_failed in warning and "preflight" in warning and GLOBEX not in warning
    runs = page.locator("#runs tbody tr")
    assert {runs.nth(i).get_attribute("data-run") for i in range(runs.count())} == {
        h.platform.state.list_runs(ACME)[1].run_id,
        acme_failed,
    }
    assert page.locator(f"#runs tr[data-run='{globex_failed}']").count() == 0
    # no support actions for a tenant admin
    assert page.locator(".support-action").count() == 0
    # the blast radius of a removal, as the API computes it
    row.locator("button[data-action=remove]").click()
    page.wait_for_selector("#blast-radius ol li")
    assert "objects" in page.inner_text("#blast-radius")
    shot = tmp_path / "console.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("ARCHIVE_KMS_CONSOLE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "docs" / "console.png")


def test_support_engineer_sees_runs_but_no_key_actions(console, browser):
    h, base, acme_failed, globex_failed = console
    page = sign_in(browser, base, h.token("support_engineer", sub="sam", tenant=None))
    runs = page.locator("#runs tbody tr")
    ids = {runs.nth(i).get_attribute("data-run") for i in range(runs.count())}
    assert {acme_failed, globex_failed} <= ids
    assert page.locator("#tenants tbody tr").count() == 2
    assert page.locator("button.key-action").count() == 0  # no enable/remove/approve/confirm
    assert page.locator(f"#runs tr[data-run='{globex_failed}'] .support-action").count() == 2
    # resume from the page: submitted to the support deployment
    page.locator(f"#runs tr[data-run='{globex_failed}'] .support-action", has_text="Resume").click()
    page.wait_for_function("document.querySelector('#message').textContent.includes('resume')")
    assert "submitted" in page.inner_text("#message")
    (sub,) = h.launcher.submitted
    assert sub["parameters"]["run_id"] == globex_failed and sub["parameters"]["action"] == "resume"


def test_removal_needs_a_second_person_on_the_page(clean_console, browser):
    """alice (tenant admin) requests the removal from the page; she is offered no approve
    button for her own request; bob (security officer) approves it on his page and the run
    is submitted."""
    h, base = clean_console
    alice = sign_in(browser, base, h.token("tenant_admin", sub="alice", tenant=ACME))
    alice.locator("button[data-action=remove]").click()
    alice.fill("#remove-reason", "customer offboarding")
    alice.click("#remove-request")
    assert "waiting for a second approver" in message(alice)
    alice.wait_for_selector("#approvals tbody tr")
    row = alice.locator("#approvals tbody tr").first
    assert "pending" in row.inner_text() and "alice" in row.inner_text()
    assert row.locator("button.approve").count() == 0
    assert h.launcher.submitted == []

    bob = sign_in(browser, base, h.token("security_officer", sub="bob", tenant=ACME))
    bob.wait_for_selector("#approvals tbody tr button.approve")
    bob.locator("#approvals tbody tr button.approve").first.click()
    assert message(bob) == "approve: started"
    (sub,) = h.launcher.submitted
    assert sub["deployment"] == "migration-remove/remove" and sub["parameters"]["actor"] == "console:alice+bob"


def test_tenant_admin_confirms_a_key_rotation_and_watches_the_warning_go(clean_console, browser):
    """The customer rotates the tenant's key; the rotate run pauses the tenant and waits.
    The tenant admin sees the rotation warning with a Confirm button, confirms on the page
    (the console issues and checks the signed single-use confirmation and submits the
    resume), the run completes (the worker's part, here in the test) and the page drops the
    warning and shows the run completed. A support engineer sees the warning but no Confirm."""
    from archive_kms.migration import engine
    from archive_kms.migration.launch import start_rotation_check
    from archive_kms.migration.rotation_monitor import observe
    from archive_kms.state.port import RotationState

    h, base = clean_console
    p = h.platform
    observe(p, ACME)  # the version known so far
    provider = p.resolve_provider(p.keychain.status(ACME).l1_ref)
    provider._kms.rotate(provider._ref.name)  # the customer rotates their key
    started = start_rotation_check(p, h.launcher, ACME, actor="monitor")
    assert started.created and h.launcher.submitted[-1]["deployment"] == "key-rotate/rotate"
    assert engine.execute(p, started.run_id, actor="worker", handle_signals=False).state == engine.WAITING

    support = sign_in(browser, base, h.token("support_engineer", sub="sam", tenant=None))
    support.wait_for_selector("#warnings li[data-kind=rotation_detected]")
    assert support.locator("#warnings button.confirm").count() == 0  # no key actions for support

    page = sign_in(browser, base, h.token("tenant_admin", sub="alice", tenant=ACME))
    confirm = page.wait_for_selector("#warnings li[data-kind=rotation_detected] button.confirm")
    assert "rotated" in page.inner_text("#warnings li[data-kind=rotation_detected]")
    confirm.click()
    assert "confirmed" in message(page), message(page)
    (rotation,) = p.state.list_rotations(ACME)
    assert rotation.state is RotationState.CONFIRMED and rotation.confirmed_by == "console:tenant_admin:alice"
    resume = h.launcher.submitted[-1]
    assert resume["deployment"] == "migration-support/support" and resume["parameters"]["action"] == "resume"

    assert engine.resume(p, started.run_id, actor="worker", handle_signals=False).state == "completed"
    page.wait_for_selector("#warnings li[data-kind=rotation_detected]", state="detached", timeout=10_000)
    page.wait_for_selector(f"#runs tr[data-run='{started.run_id}'][data-state=completed]", timeout=10_000)
    assert p.state.get_rotation(rotation.rotation_id).state is RotationState.COMPLETED
