"""The platform's own key (tenants without BYOK): a KMS key we own, behind the alias
``alias/archive-kms-managed`` (``managed://platform``) or ``alias/archive-kms-managed-NAME``.

It behaves exactly like ``aws_kms.AwsKmsKeyProvider`` (wrap = Encrypt with the tenant
context, unwrap = Decrypt pinned to the key ARN recorded at wrap time). The difference is
ownership: the key is created on first use if the alias does not exist yet (``wrap`` and
``status`` create it; ``unwrap`` never does, since nothing can have been wrapped under a key
that does not exist), with automatic rotation enabled.

Two processes creating it at once: both create a key, one ``CreateAlias`` wins, the loser
schedules its own key for deletion (7 days) and uses the winner's.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from archive_kms import clients
from archive_kms.config import Settings
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.errors import ArchiveKmsError, KeyNotFoundError, ValidationError
from archive_kms.keys.aws_kms import AwsKmsKeyProvider, _utcnow, translate_client_error
from archive_kms.keys.port import KeyStatus, WrappedKey
from archive_kms.keys.refs import ManagedKeyRef, parse_key_ref

__all__ = ["ManagedKeyProvider"]

_log = logging.getLogger(__name__)
T = TypeVar("T")


class ManagedKeyProvider:
    """KeyProvider for a platform-managed KMS key."""

    def __init__(
        self,
        ref: str | ManagedKeyRef,
        kms: Any,
        *,
        create_if_missing: bool = True,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        parsed = parse_key_ref(ref)
        if not isinstance(parsed, ManagedKeyRef):
            raise ValidationError(f"ManagedKeyProvider needs a managed:// reference, got {parsed.uri}")
        self._ref = parsed
        self._kms = kms
        self._create = create_if_missing
        self._inner = AwsKmsKeyProvider(f"aws-kms://{parsed.alias}", kms, clock=clock)
        self._lock = threading.Lock()
        self._arn: str | None = None  # set once the key is known to exist

    @classmethod
    def from_settings(cls, ref: ManagedKeyRef, settings: Settings) -> ManagedKeyProvider:
        return cls(ref, clients.kms_client(settings))

    @property
    def key_ref(self) -> str:
        return self._ref.uri

    @property
    def alias(self) -> str:
        return self._ref.alias

    def __repr__(self) -> str:
        return f"ManagedKeyProvider({self._ref.uri!r} -> {self._ref.alias!r})"

    def wrap(self, key: SecretBytes, *, context: Mapping[str, str]) -> WrappedKey:
        return self._named(lambda: (self.ensure(), self._inner.wrap(key, context=context))[1])

    def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> SecretBytes:
        return self._named(lambda: self._inner.unwrap(wrapped, context=context))

    def status(self) -> KeyStatus:
        if self._create:
            self._named(self.ensure)
        inner = self._inner.status()
        return KeyStatus(
            key_ref=self.key_ref,
            state=inner.state,
            key_version=inner.key_version,
            expires_at=inner.expires_at,
            details={**inner.details, "alias": self.alias},
        )

    def check_metadata(self) -> dict[str, str]:
        return self._named(lambda: (self.ensure(), self._inner.check_metadata())[1])

    def _named(self, fn: Callable[[], T]) -> T:
        """Run ``fn``; errors are re-raised naming ``managed://NAME`` as well as the alias/ARN."""
        try:
            return fn()
        except ArchiveKmsError as exc:
            error = copy.copy(exc)  # same type, state and retryability
            error.args = (f"managed key {self.key_ref}: {exc}",)
            error.resource = self.key_ref
        raise error

    def ensure(self) -> str:
        """The key ARN behind the alias, creating key and alias if the alias is absent and
        ``create_if_missing``; otherwise KeyNotFoundError. One DescribeKey per provider."""
        with self._lock:
            if self._arn is None:
                try:
                    self._arn = self._inner.describe().arn
                except KeyNotFoundError:
                    if not self._create:
                        raise
                    self._arn = self._create_key()
            return self._arn

    def _create_key(self) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        error = None
        try:
            created = self._kms.create_key(
                Description=f"archive_kms platform key for managed tenants ({self.key_ref})",
                KeySpec="SYMMETRIC_DEFAULT",
                KeyUsage="ENCRYPT_DECRYPT",
                Tags=[
                    {"TagKey": "archive-kms:purpose", "TagValue": "managed"},
                    {"TagKey": "archive-kms:ref", "TagValue": self.key_ref},
                ],
            )["KeyMetadata"]["Arn"]
            try:
                self._kms.create_alias(AliasName=self.alias, TargetKeyId=created)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "AlreadyExistsException":
                    raise
                # Another process won the race: drop our key, use theirs.
                self._kms.schedule_key_deletion(KeyId=created, PendingWindowInDays=7)
                return self._inner.describe().arn
            try:
                self._kms.enable_key_rotation(KeyId=created)
            except ClientError as exc:  # the key works without it; operators must see it, though
                _log.warning(
                    "managed key %s (%s): could not enable automatic rotation: %s",
                    self.key_ref,
                    created,
                    exc.response.get("Error", {}).get("Code"),
                )
            _log.info("created managed key %s for %s", created, self.key_ref)
            return str(created)
        except (ClientError, BotoCoreError) as exc:
            error = translate_client_error(exc, operation="CreateKey", key_ref=self.key_ref)
        raise error
