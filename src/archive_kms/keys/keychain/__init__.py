"""The keychain: the L2/L3/L4 key hierarchy under a tenant's L1 key. No Prefect, no I/O
beyond the store and the key provider passed in. ``docs/key-hierarchy.md`` is the
narrative; this docstring is the short version.

::

    L1  KeyProvider (customer / platform master key)      wraps L2 with context {"tenant": id}
    L2  tenant key     "l2/<g>"                  32 random bytes, stored only wrapped by L1
    L3  workspace key  "l3/<workspace>/<g>"      AES-256-GCM-wrapped by L2
    L4  DEK            "l4/<workspace>/<bucket>/<g>"  AES-256-GCM-wrapped by L3, one per
                       workspace per time bucket (floor(ts / bucket_seconds), hourly default)

The DEK id is what an object header carries; it is deterministic per (tenant, workspace,
bucket, generation) and ``dek_by_id`` needs nothing else. Wrap AAD binds level, tenant,
workspace, key id, generation and parent (id, generation).

Rotation has one rule (MultiFernet's): the newest key encrypts, any allowed key decrypts,
rotation re-wraps. Only the DEK of the newest bucket encrypts (ACTIVE); older DEKs are
DECRYPT_ONLY; DESTROYED keys are gone (crypto-erasure). ``rotate_l1`` re-wraps one L2
key (1 provider unwrap + 1 wrap, whatever the data volume); ``rotate_l2`` makes a new L2
and re-wraps the L3 keys (not the DEKs); ``rotate_l3`` makes a new workspace key and
re-wraps that workspace's DEKs. ``rekey_below_l1`` (after binding a new L1) replaces every
L2/L3 key a copy of the keychain from before the bind could open, so such a copy opens no
DEK made afterwards; ``erase_deks_below`` then destroys the DEKs up to a floor. Both DEK
erasures (``erase_buckets``, ``erase_deks_below``) replace the workspace key in the same
commit, so a kept copy of an erased DEK's row opens under no live key.

Every record and the per-tenant head are signed by the platform key and checked on
load: an edited, swapped (another tenant's) or replayed (older version) record raises
``KeychainTamperedError``. Before every unwrap, from cache or provider, the tenant's
revocation flag in the signed head is read; a revoked tenant gets ``TenantRevokedError``
and its cached keys are purged.

With an audit log (``audit=``, always in production wiring), every commit that changes
the tenant's security state (everything but routine DEK and workspace creation) is
recorded as ``keychain.<action>`` with the new head version; erasures carry their signed
``ErasureRecord``. The first load of a tenant's head in a process (and again every
``audit_refresh_seconds``) reads the highest head version the log recorded and refuses an
older head (``KeychainTamperedError``: the keychain was rolled back), so a fresh process
cannot be served a restored old keychain. ADR 0007 explains the choices.

Where each part lives (``archive_kms.keys.keychain.<module>``):

=============== ===================================================================
``keychain``    :class:`Keychain`, the one object callers hold; it composes the rest
``ids``         tenant, workspace and DEK ids; buckets and times
``values``      what the methods return (``DataKey``, ``DekInfo``, ``TenantKeyStatus``, ...)
``records``     signing records and heads; checking each record against its head
``heads``       loading a verified head (replay, rollback and revocation checks) and
                committing a plan under it (compare-and-set, re-plan on conflict)
``audit``       the audit port the keychain needs, recording commits, the audited mark
``wrapping``    L2 under L1 (provider calls), L3/L4 under their parent (AES-GCM from
                ``crypto.keychain_keys``), and finding a key's bytes via the cache
``deks``        workspaces, DEKs for encryption and by id, search material
``rotation``    ``rotate_l1``/``l2``/``l3``, ``rekey_below_l1``
``revocation``  ``revoke``, ``restore``
``erasure``     ``erase_*`` and the signed :class:`ErasureRecord`
=============== ===================================================================

The stored values (``KeyRecord``, ``TenantHead``) are in ``domain.keychain``; the store
port in ``keys.keychain_store``. ADR 0010 explains the split.
"""

from archive_kms.keys.keychain.audit import KeychainAuditLog
from archive_kms.keys.keychain.erasure import ErasureRecord
from archive_kms.keys.keychain.ids import DEFAULT_BUCKET_SECONDS, bucket_of, dek_id, parse_dek_id
from archive_kms.keys.keychain.keychain import Keychain
from archive_kms.keys.keychain.values import (
    DataKey,
    DekInfo,
    ProviderCallCounts,
    RekeyReport,
    TenantKeyStatus,
)

__all__ = [
    "DEFAULT_BUCKET_SECONDS",
    "DataKey",
    "DekInfo",
    "ErasureRecord",
    "Keychain",
    "KeychainAuditLog",
    "ProviderCallCounts",
    "RekeyReport",
    "TenantKeyStatus",
    "bucket_of",
    "dek_id",
    "parse_dek_id",
]
