"""A KMIP key's *version* on the real PyKMIP server (ADR 0038): the UID of the newest
Active symmetric key bearing the key's Name. A customer rotates an HSM key by creating a
new object under the same Name and activating it; the monitor then sees a new version and
the rotation moves the tenant onto that object. Objects not Active, of another Name, or
ambiguous (two newest created in the same second) are not a rotation."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.keys.kmip import KmipKeyProvider
from archive_kms.keys.refs import KmipKeyRef, parse_key_ref, replacement_ref


@pytest.fixture
def hsm(kmip: Settings) -> Iterator[Callable[..., str]]:
    """``make(name, activate=True, after=None)``: a new AES-256 object (its UID), created
    in a later second than the object ``after`` if given. Revoked and destroyed at the end."""
    made: list[str] = []

    def admin(action: Callable[[Any], Any]) -> Any:
        with clients.kmip_client(kmip) as client:
            return action(client)

    def initial_date(uid: str) -> int:
        _, rows = admin(lambda c: c.get_attributes(uid, ["Initial Date"]))
        return int(rows[0].attribute_value.value)

    def make(name: str, *, activate: bool = True, after: str | None = None) -> str:
        from kmip.core import enums

        if after is not None:
            floor = initial_date(after)
            while int(time.time()) <= floor:  # Initial Date has 1 s resolution
                time.sleep(0.05)
        mask = [enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT]
        uid = admin(lambda c: c.create(enums.CryptographicAlgorithm.AES, 256, name=name, cryptographic_usage_mask=mask))
        if activate:
            admin(lambda c: c.activate(uid))
        made.append(uid)
        return str(uid)

    make.initial_date = initial_date  # type: ignore[attr-defined]
    yield make
    from kmip.core import enums

    for uid in made:
        for action in (
            lambda c, u=uid: c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, u),
            lambda c, u=uid: c.destroy(u),
        ):
            try:
                admin(action)
            except Exception:  # noqa: BLE001 - a pre-active key cannot be revoked; destroy it anyway
                pass


def provider(settings: Settings, uid: str) -> KmipKeyProvider:
    ref = parse_key_ref(f"kmip://{settings.kmip_host}:{settings.kmip_port}/{uid}")
    assert isinstance(ref, KmipKeyRef)
    return KmipKeyProvider.from_settings(ref, settings)


def test_a_key_alone_is_its_own_version(kmip, hsm):
    uid = hsm(f"series-{os.urandom(4).hex()}")
    status = provider(kmip, uid).status()
    assert status.key_version == uid and "replaced_by" not in status.details
    assert status.details["name"].startswith("series-")


def test_a_newer_active_object_of_the_same_name_is_the_new_version(kmip, hsm):
    name = f"series-{os.urandom(4).hex()}"
    old = hsm(name)
    hsm(f"other-{os.urandom(4).hex()}", after=old)  # another name: not ours
    hsm(name, activate=False, after=old)  # pre-active: the customer has not switched to it
    assert provider(kmip, old).status().key_version == old
    new = hsm(name, after=old)
    status = provider(kmip, old).status()
    assert status.key_version == new and status.details["replaced_by"] == new
    assert status.state.usable  # the old object still answers: it is the customer's to deactivate
    assert provider(kmip, new).status().key_version == new  # the newest is its own version
    assert replacement_ref(provider(kmip, old).key_ref, new) == provider(kmip, new).key_ref


def test_two_newest_objects_from_the_same_second_are_no_rotation(kmip, hsm):
    name = f"series-{os.urandom(4).hex()}"
    old = hsm(name)
    for _ in range(5):  # two objects created in one second (usually the first try)
        a = hsm(name, after=old)
        b = hsm(name)
        if hsm.initial_date(a) == hsm.initial_date(b):  # type: ignore[attr-defined]
            break
    else:
        pytest.fail("could not create two objects within one second")
    assert provider(kmip, old).status().key_version == old
