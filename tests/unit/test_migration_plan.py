"""Planning a migration run: mode / key / cloud checks, tenants already on their own key
or already managed, fan-out bounds, and the plan stored as the run's params (issue #6)."""

from __future__ import annotations

import pytest

from archive_kms.domain.tenants import azure_storage_account_name
from archive_kms.errors import StateError, ValidationError
from archive_kms.migration import STEPS, EnableMode, MigrationPlan, plan_enable, plan_remove
from archive_kms.migration.engine import SHARD_FUNCTIONS, shard_function
from archive_kms.migration.plan import POINT_OF_NO_RETURN
from archive_kms.migration.steps import STEP_FUNCTIONS
from archive_kms.operations.platform import Platform
from archive_kms.operations.tenants import MANAGED_KEY_REF, create_tenant
from archive_kms.search import index_name
from archive_kms.state.port import KeyMode

KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
AWS = f"aws-kms://{KEY_ARN}"
AZURE_KV = "azure-kv://vault.example.net/keys/tenant-key"
KMIP = "kmip://hsm.example.net:5696/uid-1"
MEMORY = "memory://customer-1"


@pytest.fixture
def p() -> Platform:
    platform = Platform.in_memory()
    create_tenant(platform, "acme", cloud="s3", provision_storage=False)
    create_tenant(platform, "beta", cloud="azure", provision_storage=False)
    return platform


# --- the steps ---------------------------------------------------------------------------------


def test_steps_are_the_product_flow_in_order_and_each_has_a_function():
    assert STEPS == (
        "preflight",
        "pause",
        "cutover_point",
        "create_destination",
        "bind_key",
        "manifest",
        "copy",
        "verify",
        "build_index",
        "cutover",
        "cleanup_source",
        "resume",
        "report",
    )
    assert tuple(STEP_FUNCTIONS) == STEPS
    assert POINT_OF_NO_RETURN == "cutover"
    assert (
        STEPS.index("verify")
        < STEPS.index("build_index")
        < STEPS.index(POINT_OF_NO_RETURN)
        < STEPS.index("cleanup_source")
    )
    for step in SHARD_FUNCTIONS:
        assert callable(shard_function(step)) and step in STEPS


# --- enable: what the plan says ---------------------------------------------------------------


def test_enable_plan_on_s3_with_a_key_arn(p):
    t = p.state.get_tenant("acme")
    plan = plan_enable(p, "acme", "byokms", AWS)
    assert (plan.tenant_id, plan.flow, plan.mode, plan.key_ref) == ("acme", "enable", "byokms", AWS)
    assert plan.source == dict(t.location)
    dest = plan.destination_location
    assert (dest.kind.value, dest.cloud.value, dest.bucket) == ("dedicated", "s3", "archive-kms-tenant-acme")
    assert dest.sse_kms_key_arn == KEY_ARN  # default bucket encryption names the customer key
    assert plan.old_index == p.index.current_index("acme") == index_name("acme", t.index_generation)
    assert plan.new_generation == t.index_generation + 1 and plan.new_index == index_name("acme", 2)
    assert plan.target_key_mode is KeyMode.BYOKMS
    assert (plan.shards, plan.parallel_shards, plan.threads_per_shard) == (8, 4, 4)
    assert p.state.list_runs("acme") == []  # planning starts nothing


@pytest.mark.parametrize(
    "tenant,mode,ref,cloud,kind",
    [
        ("acme", "byok", AWS, "s3", "dedicated"),
        ("acme", "kmip", KMIP, "s3", "dedicated"),
        ("beta", "byokv", AZURE_KV, "azure", "dedicated"),
        ("beta", "byok", AZURE_KV, "azure", "dedicated"),
        ("beta", "kmip", KMIP, "azure", "dedicated"),
    ],
)
def test_each_mode_plans_onto_its_cloud(p, tenant, mode, ref, cloud, kind):
    plan = plan_enable(p, tenant, mode, ref)
    dest = plan.destination_location
    assert (dest.cloud.value, dest.kind.value) == (cloud, kind)
    assert plan.mode == mode and plan.key_ref == ref
    if cloud == "azure":  # the tenant's own storage account, under the customer's key if it is in Key Vault
        assert dest.container == f"byok-{tenant}" and dest.own_account
        assert dest.account == azure_storage_account_name(tenant, prefix=p.settings.azure_tenant_account_prefix)
        want = "https://vault.example.net/keys/tenant-key" if mode in ("byokv", "byok") else None
        assert dest.cmk_key_url == want
    if mode != "byok":
        assert dest.sse_kms_key_arn is None  # only keys in AWS KMS go into bucket encryption


def test_azure_container_mode_plans_a_container_in_the_platform_account(p):
    p.settings = p.settings.model_copy(update={"azure_dedicated_storage": "container"})
    dest = plan_enable(p, "beta", "byokv", AZURE_KV).destination_location
    assert (dest.account, dest.container, dest.own_account) == (p.settings.shared_azure_account, "byok-beta", False)
    assert "own_account" not in plan_enable(p, "beta", "byokv", AZURE_KV).destination  # stored as before


def test_the_in_memory_scheme_is_accepted_for_every_mode(p):
    for mode in ("byokms", "byok", "kmip"):
        assert plan_enable(p, "acme", mode, MEMORY).key_ref == MEMORY
    assert plan_enable(p, "beta", "byokv", MEMORY).key_ref == MEMORY


# --- enable: refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,ref,needs",
    [
        ("byokms", AZURE_KV, "aws-kms"),
        ("byokms", KMIP, "aws-kms"),
        ("byokv", AWS, "azure-kv"),
        ("byokv", KMIP, "azure-kv"),
        ("kmip", AWS, "kmip"),
        ("kmip", AZURE_KV, "kmip"),
        ("byokms", MANAGED_KEY_REF, "aws-kms"),
    ],
)
def test_a_key_of_the_wrong_scheme_for_the_mode_is_refused(p, mode, ref, needs):
    scheme = ref.split("://")[0]
    with pytest.raises(ValidationError, match=f"mode {mode} needs a {needs}:// key reference, got a {scheme}:// one"):
        plan_enable(p, "acme" if mode != "byokv" else "beta", mode, ref)


@pytest.mark.parametrize("mode", ["BYOKMS", "byo", "managed", ""])
def test_an_unknown_mode_is_refused_with_the_valid_ones(p, mode):
    with pytest.raises(ValidationError, match="use one of byokms, byok, byokv, kmip"):
        plan_enable(p, "acme", mode, AWS)


@pytest.mark.parametrize("ref", ["aws-kms://", "arn:aws:kms:us-east-1:1:key/x", "memory://a b", "nope://x"])
def test_a_malformed_key_reference_is_refused(p, ref):
    with pytest.raises(ValidationError):
        plan_enable(p, "acme", "byokms", ref)


@pytest.mark.parametrize(
    "tenant,mode,ref,cloud,message",
    [
        ("acme", "byokv", AZURE_KV, None, "mode byokv runs on azure, not s3"),
        ("beta", "byokms", AWS, None, "mode byokms runs on s3, not azure"),
        ("beta", "byok", AWS, None, "mode byok on azure needs a azure-kv:// key reference, got a aws-kms:// one"),
        ("acme", "byok", AZURE_KV, None, "mode byok on s3 needs a aws-kms:// key reference, got a azure-kv:// one"),
        (
            "acme",
            "kmip",
            KMIP,
            "azure",
            "tenant acme lives on s3; moving between clouds is not supported (use --cloud s3)",
        ),
        ("beta", "kmip", KMIP, "s3", "tenant beta lives on azure; moving between clouds is not supported"),
        ("acme", "byokms", AWS, "azure", "mode byokms runs on s3, not azure"),
        ("acme", "kmip", KMIP, "gcp", "mode kmip runs on s3 or azure, not gcp"),
    ],
)
def test_cloud_mismatches_are_refused(p, tenant, mode, ref, cloud, message):
    with pytest.raises(ValidationError) as err:
        plan_enable(p, tenant, mode, ref, cloud=cloud)
    assert message in str(err.value)


def test_enabling_a_tenant_already_on_its_own_key_is_refused(p):
    create_tenant(p, "gamma", cloud="s3", key_ref=MEMORY, provision_storage=False)  # own key from day one
    with pytest.raises(
        ValidationError, match="tenant gamma already uses its own key .*run `archive-kms remove gamma` first"
    ):
        plan_enable(p, "gamma", "byokms", MEMORY)


def test_enabling_a_tenant_in_dedicated_storage_is_refused(p):
    """What a completed enable leaves: a customer key and a dedicated bucket."""
    from dataclasses import replace

    plan = plan_enable(p, "acme", "byokms", MEMORY)
    t = p.state.get_tenant("acme")
    p.state.update_tenant(replace(t, location=dict(plan.destination), key_mode=KeyMode.BYOKMS, key_ref=MEMORY))
    with pytest.raises(ValidationError, match="already uses its own key \\(byokms, s3://archive-kms-tenant-acme/\\)"):
        plan_enable(p, "acme", "byokms", MEMORY)


def test_unknown_and_malformed_tenants(p):
    with pytest.raises(StateError, match="unknown tenant 'nobody'"):
        plan_enable(p, "nobody", "byokms", AWS)
    with pytest.raises(StateError, match="unknown tenant 'nobody'"):
        plan_remove(p, "nobody")
    for bad in ("Acme", "acme/../beta", "a*", ""):
        with pytest.raises(ValidationError):
            plan_enable(p, bad, "byokms", AWS)
        with pytest.raises(ValidationError):
            plan_remove(p, bad)


# --- remove ------------------------------------------------------------------------------------


def test_remove_on_a_managed_tenant_is_refused(p):
    with pytest.raises(
        ValidationError, match="tenant acme is on the managed key in shared storage already; nothing to remove"
    ):
        plan_remove(p, "acme")


def test_remove_plans_back_to_a_shared_entity_under_the_managed_key(p):
    from dataclasses import replace

    shared = dict(p.state.get_tenant("acme").location)
    enable = plan_enable(p, "acme", "byokms", MEMORY)
    t = p.state.get_tenant("acme")
    p.state.update_tenant(
        replace(t, location=dict(enable.destination), key_mode=KeyMode.BYOKMS, key_ref=MEMORY, index_generation=2)
    )
    plan = plan_remove(p, "acme")
    assert (plan.flow, plan.mode, plan.key_ref) == ("remove", "managed", MANAGED_KEY_REF)
    assert plan.source == enable.destination and plan.destination == shared
    assert plan.new_generation == 3 and plan.target_key_mode is KeyMode.MANAGED


# --- fan-out bounds ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["shards", "parallel_shards", "threads_per_shard"])
@pytest.mark.parametrize("value", [0, -1, 257, 10_000, True, 2.0, "8"])
def test_fanout_out_of_bounds_is_refused(p, field, value):
    with pytest.raises(ValidationError, match=f"{field} must be an integer in 1..256"):
        plan_enable(p, "acme", "byokms", MEMORY, **{field: value})


@pytest.mark.parametrize("value", [1, 2, 256])
def test_fanout_within_bounds(p, value):
    plan = plan_enable(p, "acme", "byokms", MEMORY, shards=value, parallel_shards=value, threads_per_shard=value)
    assert (plan.shards, plan.parallel_shards, plan.threads_per_shard) == (value, value, value)


def test_fanout_none_means_the_default(p):
    """None is "not given" (the CLI passes None when the option is absent); 0 is refused above."""
    plan = plan_enable(p, "acme", "byokms", MEMORY, shards=None, parallel_shards=None, threads_per_shard=None)
    assert (plan.shards, plan.parallel_shards, plan.threads_per_shard) == (8, 4, 4)


def test_remove_checks_the_fanout_too(p):
    from dataclasses import replace

    enable = plan_enable(p, "acme", "byokms", MEMORY)
    t = p.state.get_tenant("acme")
    p.state.update_tenant(replace(t, location=dict(enable.destination), key_mode=KeyMode.BYOKMS, key_ref=MEMORY))
    with pytest.raises(ValidationError, match="shards must be an integer in 1..256"):
        plan_remove(p, "acme", shards=300)
    assert plan_remove(p, "acme", shards=3).shards == 3


# --- the plan as the run's params ----------------------------------------------------------------


def test_plan_round_trips_through_run_params(p):
    plan = plan_enable(p, "acme", "byokms", AWS, shards=5)
    params = plan.to_params()
    import json

    assert json.loads(json.dumps(params)) == params  # JSON, as the state store keeps it
    assert MigrationPlan.from_params(params) == plan
    # a newer writer's extra field does not stop an older reader (rerun after an upgrade, faults D11)
    assert MigrationPlan.from_params({**params, "added_later": 1}) == plan


def test_enable_mode_values_match_key_modes():
    for mode in EnableMode:
        assert KeyMode(mode.value).value == mode.value
