"""KMIP HSM adapter: the master key is an AES-256 key inside the KMIP server; it never leaves.

Wrap = KMIP ``Encrypt`` and unwrap = KMIP ``Decrypt`` of the L2 key with **AES-256-GCM
inside the HSM**, with the context as GCM additional authenticated data:

* ``aad = b"archive_kms/kmip-wrap/v1\\n" || canonical_context``;
* ``ciphertext = nonce (12) || GCM ciphertext (len(key)) || tag (16)``;
* ``WrappedKey.algorithm = "kmip:AES-256-GCM"``, ``key_ref = kmip://HOST:PORT/UID``.

Why GCM and not CBC plus something. KMIP 1.4 carries ``Authenticated Encryption Additional
Data`` and ``Authenticated Encryption Tag`` in Encrypt/Decrypt, and PyKMIP 0.11's server
implements them; checked against the running server (wrong AAD or a modified tag is
refused). GCM authenticates key, ciphertext and context in one HSM call with no key
outside the HSM. CBC was rejected: with a plain context prefix inside CBC, flipping IV bits
rewrites the first plaintext block predictably, so a wrapped key could be re-bound to
another tenant's context; fixing that needs encrypt-then-MAC with a second HSM key (two
calls per operation). PyKMIP's *client* API does not expose the GCM fields, so this module
builds the request payloads itself and sends them with ``KMIPProxy.send_request_payload``
(public), with the connection negotiated at KMIP 1.4.

Nonces are 96-bit random values drawn here (``os.urandom``): at most 2**32 wraps per key
keep the collision risk below 2**-32, and the number of L2 wraps is tiny (one per tenant per
rotation). An HSM that insists on generating IVs itself needs ``random_iv`` instead.

State: ``Get Attributes(State)``. PRE_ACTIVE -> DISABLED; ACTIVE -> ENABLED; DEACTIVATED,
COMPROMISED (revoked) and DESTROYED -> REVOKED. The server refuses Encrypt/Decrypt with a
non-ACTIVE key with ``PERMISSION_DENIED``; the adapter then reads the State and raises
``KeyUnavailableError(state=...)``.

Connections: PyKMIP's client is not thread-safe, so the provider keeps one mutual-TLS
connection behind a lock, opened on first use and reopened once if it breaks (Encrypt,
Decrypt and Get Attributes are safe to repeat).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import (
    ArchiveKmsError,
    ConfigurationError,
    KeyAccessDeniedError,
    KeyError_,
    KeyNotFoundError,
    KeyUnavailableError,
    ServiceUnavailableError,
    ValidationError,
    WrongKeyError,
)
from archive_kms.keys.context import canonical_context
from archive_kms.keys.port import KeyState, KeyStatus, WrappedKey
from archive_kms.keys.refs import KmipKeyRef, parse_key_ref, wrapped_key_ref

__all__ = ["ALGORITHM", "KmipKeyProvider"]

log = logging.getLogger(__name__)


ALGORITHM = "kmip:AES-256-GCM"
_AAD_LABEL = b"archive_kms/kmip-wrap/v1\n"
_NONCE = 12
_TAG = 16
_ATTRIBUTES = [
    "State",
    "Object Type",
    "Cryptographic Algorithm",
    "Cryptographic Length",
    "Cryptographic Usage Mask",
    "Name",
    "Initial Date",
]


def _state_map() -> dict[Any, KeyState]:
    from kmip.core import enums

    return {
        enums.State.PRE_ACTIVE: KeyState.DISABLED,
        enums.State.ACTIVE: KeyState.ENABLED,
        enums.State.DEACTIVATED: KeyState.REVOKED,
        enums.State.COMPROMISED: KeyState.REVOKED,
        enums.State.DESTROYED: KeyState.REVOKED,
        enums.State.DESTROYED_COMPROMISED: KeyState.REVOKED,
    }


class KmipKeyProvider:
    """KeyProvider over one AES-256 key in a KMIP server.

    ``client_factory`` returns a new, unopened ``ProxyKmipClient`` (``clients.kmip_client``).
    """

    algorithm = ALGORITHM

    def __init__(self, ref: str | KmipKeyRef, client_factory: Callable[[], Any]) -> None:
        parsed = parse_key_ref(ref)
        if not isinstance(parsed, KmipKeyRef):
            raise ValidationError(f"KmipKeyProvider needs a kmip:// reference, got {parsed.uri}")
        self._ref = parsed
        self._factory = client_factory
        self._lock = threading.Lock()
        self._client: Any = None

    @classmethod
    def from_settings(cls, ref: KmipKeyRef, settings: Settings) -> KmipKeyProvider:
        if (ref.host, ref.port) != (settings.kmip_host, settings.kmip_port):
            raise ConfigurationError(
                f"key {ref.uri}: no KMIP mutual-TLS configuration for {ref.host}:{ref.port}; the configured "
                f"KMIP server is {settings.kmip_host}:{settings.kmip_port} (ARCHIVE_KMS_KMIP_HOST/PORT)",
                resource=ref.uri,
            )
        return cls(ref, lambda: clients.kmip_client(settings))

    @property
    def key_ref(self) -> str:
        return self._ref.uri

    def __repr__(self) -> str:
        return f"KmipKeyProvider({self._ref.uri!r})"

    def close(self) -> None:
        with self._lock:
            self._drop()

    # --- KeyProvider ---------------------------------------------------------------------

    def wrap(self, key: SecretBytes, *, context: Mapping[str, str]) -> WrappedKey:
        from kmip.core import enums
        from kmip.core.messages import payloads

        aad = _AAD_LABEL + canonical_context(context)
        nonce = os.urandom(_NONCE)
        plaintext = key.reveal()

        def encrypt(client: Any) -> Any:
            return client.proxy.send_request_payload(
                enums.Operation.ENCRYPT,
                payloads.EncryptRequestPayload(
                    unique_identifier=self._ref.uid,
                    cryptographic_parameters=_gcm_parameters(),
                    data=plaintext,
                    iv_counter_nonce=nonce,
                    auth_additional_data=aad,
                ),
            )

        response = self._call("Encrypt", encrypt)
        tag = response.auth_tag or b""
        if len(tag) != _TAG or len(response.data or b"") != len(plaintext):
            raise ServiceUnavailableError(
                f"KMIP Encrypt for {self.key_ref}: the server's answer is not an AES-GCM ciphertext with a 16-byte tag",
                resource=self.key_ref,
            )
        return WrappedKey(key_ref=self.key_ref, algorithm=ALGORITHM, ciphertext=nonce + response.data + tag)

    def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> SecretBytes:
        from kmip.core import enums
        from kmip.core.messages import payloads

        aad = _AAD_LABEL + canonical_context(context)
        self._check_owned(wrapped)
        data = wrapped.ciphertext
        if len(data) <= _NONCE + _TAG:
            raise WrongKeyError(
                f"wrapped key for {self.key_ref} is too short ({len(data)} bytes)", resource=self.key_ref
            )
        nonce, body, tag = data[:_NONCE], data[_NONCE:-_TAG], data[-_TAG:]

        def decrypt(client: Any) -> Any:
            return client.proxy.send_request_payload(
                enums.Operation.DECRYPT,
                payloads.DecryptRequestPayload(
                    unique_identifier=self._ref.uid,
                    cryptographic_parameters=_gcm_parameters(),
                    data=body,
                    iv_counter_nonce=nonce,
                    auth_additional_data=aad,
                    auth_tag=tag,
                ),
            )

        response = self._call("Decrypt", decrypt)
        return SecretBytes(response.data)

    def status(self) -> KeyStatus:
        try:
            attributes = self._attributes()
        except KeyNotFoundError:
            return KeyStatus(key_ref=self.key_ref, state=KeyState.NOT_FOUND)
        except KeyAccessDeniedError:
            return KeyStatus(key_ref=self.key_ref, state=KeyState.ACCESS_DENIED)
        state = _state_map().get(attributes.get("State"), KeyState.DISABLED)
        version = self._series_current(attributes)
        details = _details(attributes)
        if version != self._ref.uid:
            details["replaced_by"] = version
        return KeyStatus(key_ref=self.key_ref, state=state, key_version=version, details=details)

    def _series_current(self, attributes: Mapping[str, Any]) -> str:
        """The key's *version* in KMIP terms: the UID of the newest Active symmetric key
        that bears this key's Name (a customer rotates an HSM key by creating a new
        object under the same Name and activating it; ADR 0038). This key's own UID when
        it has no Name, when no newer object exists, or when the newest are ambiguous
        (created in the same second: ``Initial Date`` has 1 s resolution). A failed
        lookup reports no rotation; the next check asks again."""
        from kmip.core import enums
        from kmip.core.factories.attributes import AttributeFactory

        name = _name_of(attributes.get("Name"))
        own_date = attributes.get("Initial Date")
        if not name or not isinstance(own_date, int):
            return self._ref.uid
        make = AttributeFactory().create_attribute
        wanted = [
            make(enums.AttributeType.NAME, name),
            make(enums.AttributeType.STATE, enums.State.ACTIVE),
            make(enums.AttributeType.OBJECT_TYPE, enums.ObjectType.SYMMETRIC_KEY),
        ]
        try:
            found = self._call("Locate", lambda client: client.locate(attributes=wanted), consult_state=False)
            newer: list[tuple[int, str]] = []
            for uid in found or ():
                if uid == self._ref.uid:
                    continue
                _, rows = self._call("GetAttributes", _initial_date_of(uid), consult_state=False)
                dates = [getattr(a.attribute_value, "value", None) for a in rows]
                if dates and isinstance(dates[0], int) and dates[0] > own_date:
                    newer.append((dates[0], str(uid)))
        except ArchiveKmsError as exc:
            log.info("KMIP key %s: looking for a newer object named %r failed (%s)", self.key_ref, name, exc)
            return self._ref.uid
        if not newer:
            return self._ref.uid
        newest = max(date for date, _ in newer)
        top = [uid for date, uid in newer if date == newest]
        if len(top) > 1:
            log.warning(
                "KMIP key %s: %d newer Active keys named %r were created in the same second (%s); "
                "no rotation is reported until one of them is deactivated",
                self.key_ref,
                len(top),
                name,
                ", ".join(sorted(top)),
            )
            return self._ref.uid
        return top[0]

    def check_metadata(self) -> dict[str, str]:
        """Preflight: a symmetric AES-256 key whose usage mask allows Encrypt and Decrypt."""
        from kmip.core import enums

        attributes = self._attributes()
        details = _details(attributes)
        problems = []
        if attributes.get("Object Type") != enums.ObjectType.SYMMETRIC_KEY:
            problems.append(f"it is a {details.get('object_type')}, not a symmetric key")
        if attributes.get("Cryptographic Algorithm") != enums.CryptographicAlgorithm.AES:
            problems.append(f"its algorithm is {details.get('algorithm')}, not AES")
        if attributes.get("Cryptographic Length") != 256:
            problems.append(f"it is {details.get('length')} bits, not 256")
        mask = int(attributes.get("Cryptographic Usage Mask") or 0)
        for bit, name in (
            (enums.CryptographicUsageMask.ENCRYPT, "Encrypt"),
            (enums.CryptographicUsageMask.DECRYPT, "Decrypt"),
        ):
            if not mask & bit.value:
                problems.append(f"its usage mask lacks {name}")
        if problems:
            raise ConfigurationError(
                f"key {self.key_ref} cannot be used as a tenant master key: " + "; ".join(problems),
                resource=self.key_ref,
            )
        return details

    # --- internals -----------------------------------------------------------------------

    def _check_owned(self, wrapped: WrappedKey) -> None:
        ref = wrapped_key_ref(wrapped, algorithm=ALGORITHM, owner=self.key_ref)
        if ref != self._ref:
            raise WrongKeyError(f"wrapped key belongs to {ref.uri}, not {self.key_ref}", resource=self.key_ref)

    def _attributes(self) -> dict[str, Any]:
        def get(client: Any) -> Any:
            return client.get_attributes(self._ref.uid, _ATTRIBUTES)

        _, attributes = self._call("GetAttributes", get, consult_state=False)
        return {a.attribute_name.value: getattr(a.attribute_value, "value", a.attribute_value) for a in attributes}

    def _open(self) -> Any:
        from kmip.core import enums

        if self._client is None:
            client = self._factory()
            client.open()
            client.kmip_version = enums.KMIPVersion.KMIP_1_4  # GCM AAD/tag fields are KMIP 1.4
            self._client = client
        return self._client

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - the connection is broken anyway
                pass

    def _call(self, operation: str, fn: Callable[[Any], Any], *, consult_state: bool = True) -> Any:
        from kmip.core.exceptions import ConnectionClosed, KmipError
        from kmip.pie.exceptions import ClientConnectionFailure, ClientConnectionNotOpen, KmipOperationFailure

        # EOFError: PyKMIP's read of an answer on a connection that ended (reset HSM, middlebox).
        transport = (
            OSError,
            EOFError,
            ssl.SSLError,
            ConnectionClosed,
            ClientConnectionFailure,
            ClientConnectionNotOpen,
        )
        error: ArchiveKmsError | None = None
        with self._lock:
            for attempt in (1, 2):
                try:
                    return fn(self._open())
                except ssl.SSLCertVerificationError as exc:
                    # Not the server we were told to trust (wrong host or CA): never retried.
                    self._drop()
                    error = ConfigurationError(
                        f"KMIP {operation} for {self.key_ref}: the server's TLS certificate does not verify "
                        f"({exc.verify_message}); check kmip_host and kmip_ca_cert",
                        resource=self.key_ref,
                    )
                    break
                except transport as exc:
                    self._drop()
                    if attempt == 2:
                        error = ServiceUnavailableError(
                            f"KMIP {operation} for {self.key_ref}: the KMIP server did not answer "
                            f"({type(exc).__name__})",
                            resource=self.key_ref,
                        )
                except (KmipOperationFailure, KmipError) as exc:
                    reason = getattr(exc, "reason", None)
                    message = str(getattr(exc, "message", None) or exc)[:300]
                    error = self._classify(operation, reason, message, consult_state)
                    break
                except Exception as exc:  # noqa: BLE001 - a malformed answer; the connection is suspect
                    self._drop()
                    error = ServiceUnavailableError(
                        f"KMIP {operation} for {self.key_ref} failed ({type(exc).__name__})", resource=self.key_ref
                    )
                    break
        assert error is not None
        raise error

    def _classify(self, operation: str, reason: Any, message: str, consult_state: bool) -> ArchiveKmsError:
        from kmip.core import enums

        where = f"KMIP {operation} for {self.key_ref}"
        said = f"{getattr(reason, 'name', reason)}: {message}"
        r = enums.ResultReason
        if reason == r.ITEM_NOT_FOUND:
            return KeyNotFoundError(f"{where}: no such key on the KMIP server ({said})", resource=self.key_ref)
        if reason == r.PERMISSION_DENIED:
            state = self._state_unlocked() if consult_state else None
            if state is not None and not state.usable:
                return KeyUnavailableError(
                    f"{where}: the key is {state.value} ({said})", resource=self.key_ref, state=state.value
                )
            return KeyAccessDeniedError(f"{where}: permission denied ({said})", resource=self.key_ref)
        if operation == "Decrypt" and reason in (r.GENERAL_FAILURE, r.CRYPTOGRAPHIC_FAILURE):
            # PyKMIP reports a failed GCM tag check as a general failure.
            return WrongKeyError(
                f"{where}: the wrapped key does not authenticate under this key and context "
                "(wrong tenant/context, wrong key, or tampered)",
                resource=self.key_ref,
            )
        if reason in (
            r.INVALID_FIELD,
            r.INVALID_MESSAGE,
            r.OPERATION_NOT_SUPPORTED,
            r.FEATURE_NOT_SUPPORTED,
            r.KEY_FORMAT_TYPE_NOT_SUPPORTED,
        ):
            return ConfigurationError(f"{where}: the server cannot do this ({said})", resource=self.key_ref)
        return KeyError_(f"{where} failed ({said})", resource=self.key_ref)

    def _state_unlocked(self) -> KeyState | None:
        """The key's state, with the lock already held (used to enrich PERMISSION_DENIED)."""
        try:
            _, attributes = self._open().get_attributes(self._ref.uid, ["State"])
        except Exception:  # noqa: BLE001 - only used to enrich another error
            return None
        for a in attributes:
            if a.attribute_name.value == "State":
                return _state_map().get(a.attribute_value.value, KeyState.DISABLED)
        return None


def _gcm_parameters() -> Any:
    from kmip.core import enums
    from kmip.core.attributes import CryptographicParameters

    return CryptographicParameters(
        block_cipher_mode=enums.BlockCipherMode.GCM,
        cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
        tag_length=_TAG,
    )


def _initial_date_of(uid: str) -> Callable[[Any], Any]:
    def get(client: Any) -> Any:
        return client.get_attributes(uid, ["Initial Date"])

    return get


def _name_of(value: Any) -> str | None:
    """The text of a KMIP ``Name`` attribute value (a ``Name`` structure)."""
    text = getattr(getattr(value, "name_value", None), "value", None)
    return text if isinstance(text, str) and text else None


def _details(attributes: Mapping[str, Any]) -> dict[str, str]:
    def name(value: Any) -> str:
        return str(getattr(value, "name", value))

    out = {}
    for key, label in (
        ("State", "kmip_state"),
        ("Object Type", "object_type"),
        ("Cryptographic Algorithm", "algorithm"),
        ("Cryptographic Length", "length"),
    ):
        if key in attributes:
            out[label] = name(attributes[key])
    if "Cryptographic Usage Mask" in attributes:
        out["usage_mask"] = str(attributes["Cryptographic Usage Mask"])
    key_name = _name_of(attributes.get("Name"))
    if key_name:
        out["name"] = key_name
    return out
