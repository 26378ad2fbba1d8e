"""Module constants that stand for a setting's default take it from ``Settings``: one
source, so a default changed in ``config.py`` changes every process that builds a part
without settings too. Fast, no services."""

from __future__ import annotations

from datetime import timedelta

import pytest

from archive_kms.config import Settings, setting_default


def _default(name: str):
    return Settings.model_fields[name].default


def test_the_constants_are_the_settings_defaults():
    from archive_kms.domain.tenants import DEFAULT_ACCOUNT_PREFIX
    from archive_kms.keys.keychain.access import DEFAULT_CHECK_SECONDS, DEFAULT_GRACE, DEFAULT_TIMEOUT_SECONDS
    from archive_kms.keys.keychain.ids import DEFAULT_BUCKET_SECONDS
    from archive_kms.migration.engine import DEFAULT_LEASE_TTL
    from archive_kms.state.port import DEFAULT_JOB_LEASE_TTL
    from archive_kms.state.sql.database import DEFAULT_POOL

    assert timedelta(seconds=_default("lease_ttl_seconds")) == DEFAULT_LEASE_TTL
    assert timedelta(seconds=_default("job_lease_ttl_seconds")) == DEFAULT_JOB_LEASE_TTL
    assert _default("dek_bucket_seconds") == DEFAULT_BUCKET_SECONDS
    assert _default("key_state_check_seconds") == DEFAULT_CHECK_SECONDS
    assert _default("key_state_check_timeout_seconds") == DEFAULT_TIMEOUT_SECONDS
    assert str(DEFAULT_GRACE) == _default("key_outage_grace")
    assert (DEFAULT_POOL.size, DEFAULT_POOL.max_overflow, DEFAULT_POOL.timeout) == (
        _default("state_pool_size"),
        _default("state_pool_max_overflow"),
        _default("state_pool_timeout_seconds"),
    )
    assert _default("azure_tenant_account_prefix") == DEFAULT_ACCOUNT_PREFIX


def test_setting_default_refuses_what_has_no_plain_default():
    assert setting_default("lease_ttl_seconds") == Settings.model_fields["lease_ttl_seconds"].default
    with pytest.raises(KeyError):
        setting_default("no_such_setting")
    with pytest.raises(TypeError, match="state_url"):
        setting_default("state_url")  # computed from the stack directory
