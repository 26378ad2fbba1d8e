"""Who is calling the console, and what they may do.

Bearer tokens are JWTs signed with Ed25519 (``EdDSA``, PyJWT) by the console's token
signing key (``console_token_signing_key_path``; on a local stack a key created once in
the stack directory). ``issue_token`` is the local issuer (``archive-kms console token``);
a real deployment puts its identity provider's signed tokens in front instead, with the
same claims.

Claims: ``iss`` = ``archive-kms``, ``aud`` = ``archive-kms-console``, ``sub`` (who),
``role`` (one of ``Role``), ``tenant`` (required for tenant admins and security officers;
absent = every tenant, allowed only for support engineers and platform admins), ``iat``,
``exp`` (at most ``MAX_TOKEN_SECONDS`` after ``iat``), ``jti``. Anything else is refused
with ``AuthError`` and one reason that never echoes the token.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from archive_kms.errors import ArchiveKmsError, ConfigurationError, ValidationError

ISSUER = "archive-kms"
AUDIENCE = "archive-kms-console"
ALGORITHM = "EdDSA"
MAX_TOKEN_SECONDS = 12 * 3600
LEEWAY_SECONDS = 30
_SUBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$")


class AuthError(ArchiveKmsError):
    """The bearer token is missing, malformed, forged, expired or not for this console."""


class Role(str, enum.Enum):
    TENANT_ADMIN = "tenant_admin"  # their own tenant: onboarding, removal, rotation confirmations
    SECURITY_OFFICER = "security_officer"  # key actions on their own tenant
    SUPPORT_ENGINEER = "support_engineer"  # runs: inspect, resume, rerun, cancel, waive; no key actions
    PLATFORM_ADMIN = "platform_admin"  # everything, every tenant


class Permission(str, enum.Enum):
    READ = "read"  # tenants, warnings, runs, approvals of the tenants in scope
    AUDIT = "audit"  # read, export and verify the audit log
    MIGRATE = "migrate"  # enable / remove (onto the customer key and back)
    KEY_LIFECYCLE = "key_lifecycle"  # revoke / restore / rotate / erase (added by the lifecycle work)
    CONFIRM_ROTATION = "confirm_rotation"  # confirm a customer-side rotation
    SUPPORT = "support"  # resume / rerun / cancel / waive runs


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.TENANT_ADMIN: frozenset({Permission.READ, Permission.AUDIT, Permission.MIGRATE, Permission.CONFIRM_ROTATION}),
    Role.SECURITY_OFFICER: frozenset(
        {Permission.READ, Permission.AUDIT, Permission.MIGRATE, Permission.KEY_LIFECYCLE, Permission.CONFIRM_ROTATION}
    ),
    Role.SUPPORT_ENGINEER: frozenset({Permission.READ, Permission.AUDIT, Permission.SUPPORT}),
    Role.PLATFORM_ADMIN: frozenset(Permission),
}
#: Roles bound to one tenant: their tokens must name it.
TENANT_ROLES = frozenset({Role.TENANT_ADMIN, Role.SECURITY_OFFICER})


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    subject: str
    role: Role
    tenant_id: str | None  # None: every tenant (support engineers, platform admins)
    token_id: str
    expires_at: datetime

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def sees(self, tenant_id: str) -> bool:
        return self.tenant_id is None or self.tenant_id == tenant_id

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"console:{self.role.value}:{self.subject}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "role": self.role.value,
            "tenant": self.tenant_id,
            "permissions": sorted(p.value for p in ROLE_PERMISSIONS[self.role]),
            "expires_at": self.expires_at.isoformat(timespec="seconds"),
        }


class TokenKeys:
    """The console's token signing key (private: issuing) and its public key (verifying)."""

    def __init__(self, private_key: Any) -> None:
        from archive_kms.crypto.signing import Ed25519PrivateKey, key_id_of

        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigurationError("the console token signing key must be an Ed25519 private key")
        self._private = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    def __repr__(self) -> str:
        return f"TokenKeys(key_id={self.key_id!r})"

    def __reduce__(self) -> Any:
        raise TypeError("TokenKeys cannot be pickled")

    @classmethod
    def generate(cls) -> TokenKeys:
        from archive_kms.crypto.signing import generate_private_key

        return cls(generate_private_key())

    @classmethod
    def from_pem_file(cls, path: str | Path) -> TokenKeys:
        from archive_kms.crypto.signing import load_private_key_pem

        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the console token signing key at {p}: {exc.strerror}") from None
        try:
            return cls(load_private_key_pem(data))
        except ValueError:
            raise ConfigurationError(f"{p} is not a PEM Ed25519 private key") from None

    @classmethod
    def create_key_file(cls, path: str | Path) -> TokenKeys:
        """A new key written to ``path`` (owner-only), for a local stack."""
        import os

        from archive_kms.crypto.signing import private_key_pem

        keys = cls.generate()
        pem = private_key_pem(keys._private)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return keys

    def sign(self, claims: dict[str, Any]) -> str:
        import jwt

        return jwt.encode(claims, self._private, algorithm=ALGORITHM, headers={"kid": self.key_id})

    def decode(self, token: str) -> dict[str, Any]:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("the bearer token is not a JWT") from None
        if header.get("alg") != ALGORITHM:
            raise AuthError(f"the bearer token must be signed with {ALGORITHM}")
        if header.get("kid") != self.key_id:
            raise AuthError("the bearer token was signed by an unknown key")
        try:
            return jwt.decode(
                token,
                self.public_key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "sub", "iss", "aud", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the bearer token has expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError("the bearer token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"the bearer token is not valid for this console ({type(exc).__name__})") from None


def check_subject(subject: str) -> str:
    if not isinstance(subject, str) or not _SUBJECT.fullmatch(subject):
        raise ValidationError(
            "sub: 1-128 characters of letters, digits and . _ @ : + -, starting with a letter or digit"
        )
    return subject


def _role(value: Any) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise ValidationError(f"role: one of {', '.join(r.value for r in Role)}") from None


def _scope(role: Role, tenant_id: str | None) -> str | None:
    from archive_kms.domain.tenants import TenantId

    if tenant_id is None:
        if role in TENANT_ROLES:
            raise ValidationError(f"tenant: a {role.value} token names its tenant")
        return None
    return TenantId(tenant_id).value


def issue_token(
    keys: TokenKeys,
    *,
    subject: str,
    role: str,
    tenant_id: str | None = None,
    ttl: timedelta = timedelta(hours=8),
    now: datetime | None = None,
) -> str:
    """A signed console token (the local issuer)."""
    r = _role(role)
    seconds = int(ttl.total_seconds())
    if not 1 <= seconds <= MAX_TOKEN_SECONDS:
        raise ValidationError(f"ttl: 1..{MAX_TOKEN_SECONDS} seconds")
    issued = now or datetime.now(UTC)
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": check_subject(subject),
        "role": r.value,
        "iat": int(issued.timestamp()),
        "exp": int(issued.timestamp()) + seconds,
        "jti": uuid.uuid4().hex,
    }
    scope = _scope(r, tenant_id)
    if scope is not None:
        claims["tenant"] = scope
    return keys.sign(claims)


def authenticate(keys: TokenKeys, token: str, *, now: Callable[[], datetime] | None = None) -> Principal:
    """The principal a bearer token speaks for; ``AuthError`` naming the one problem."""
    if not token or len(token) > 4096:
        raise AuthError("missing or oversized bearer token")
    claims = keys.decode(token)
    try:
        role = _role(claims.get("role"))
        subject = check_subject(str(claims.get("sub") or ""))
        scope = _scope(role, claims.get("tenant"))
    except ValidationError as exc:
        raise AuthError(f"the bearer token's claims are not acceptable: {exc}") from None
    if int(claims["exp"]) - int(claims["iat"]) > MAX_TOKEN_SECONDS:
        raise AuthError(f"the bearer token lives longer than {MAX_TOKEN_SECONDS} s")
    return Principal(
        subject=subject,
        role=role,
        tenant_id=scope,
        token_id=str(claims["jti"]),
        expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
    )


def token_keys(settings: Any) -> TokenKeys:
    """The console token key from settings; on a local stack without one, a key created once
    in the stack directory."""
    from archive_kms.config import stack_dir

    configured = getattr(settings, "console_token_signing_key_path", None)
    if configured:
        return TokenKeys.from_pem_file(configured)
    path = stack_dir() / "console-token-signing.pem"
    if not path.exists():
        try:
            return TokenKeys.create_key_file(path)
        except FileExistsError:
            pass  # another process made it first
    return TokenKeys.from_pem_file(path)


__all__ = [
    "AUDIENCE",
    "ISSUER",
    "ROLE_PERMISSIONS",
    "AuthError",
    "Permission",
    "Principal",
    "Role",
    "TokenKeys",
    "authenticate",
    "issue_token",
    "token_keys",
]
