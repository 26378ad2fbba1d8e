"""Synthetic archives for demos, tests and benchmarks: deterministic from a seed.

Records look like Salesforce exports (Account, Contact, Case, Opportunity,
EmailMessage); attachments follow a size mix from a few KB to (optionally) hundreds of
MB. Attachment bytes come from an AES-CTR keystream of the seed, so any size is
produced lazily at GB/s with constant memory and is identical on every run.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

from archive_kms.crypto.keystream import aes_ctr_keystream
from archive_kms.domain.records import AttachmentData, AttachmentRef, Record

_WORDS = [
    "invoice",
    "renewal",
    "contract",
    "escalation",
    "outage",
    "refund",
    "shipment",
    "warranty",
    "quarterly",
    "forecast",
    "pipeline",
    "churn",
    "onboarding",
    "migration",
    "compliance",
    "audit",
    "retention",
    "subscription",
    "discount",
    "priority",
    "severity",
    "customer",
    "partner",
    "reseller",
    "enterprise",
    "pilot",
    "proposal",
    "signature",
    "legal",
    "security",
    "incident",
    "firmware",
    "license",
    "upgrade",
    "downgrade",
    "billing",
    "payment",
    "overdue",
    "credit",
]
_COMPANIES = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka", "Tyrell", "Cyberdyne")
_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim")
_TYPES = ("Account", "Contact", "Case", "Opportunity", "EmailMessage")


@dataclass(frozen=True)
class SizeMix:
    """Attachment sizes as (weight, min_bytes, max_bytes) bands."""

    bands: tuple[tuple[float, int, int], ...] = (
        (0.7, 2_000, 60_000),
        (0.25, 60_000, 2_000_000),
        (0.05, 2_000_000, 8_000_000),
    )
    attachment_probability: float = 0.3

    @classmethod
    def small(cls) -> SizeMix:
        """Fast tests: a few KB to 200 KB."""
        return cls(bands=((0.8, 1_000, 20_000), (0.2, 20_000, 200_000)), attachment_probability=0.4)

    @classmethod
    def large(cls) -> SizeMix:
        """Benchmarks: includes objects of hundreds of MB."""
        return cls(bands=((0.6, 5_000, 100_000), (0.3, 100_000, 20_000_000), (0.1, 100_000_000, 400_000_000)))


def keystream(seed: bytes, size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """``size`` deterministic pseudo-random bytes, in chunks, constant memory."""
    key = hashlib.sha256(b"archive_kms/synthetic/" + seed).digest()
    return aes_ctr_keystream(key, size, chunk=chunk)


def _record_id(rng: random.Random, prefix: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return prefix + "".join(rng.choice(alphabet) for _ in range(15))


def generate_records(
    tenant_id: str, count: int, *, seed: int = 0, mix: SizeMix | None = None, workspaces: int = 1
) -> Iterator[tuple[Record, list[AttachmentData]]]:
    """``count`` records for one tenant, each with its attachments (bytes produced lazily)."""
    mix = mix or SizeMix.small()
    rng = random.Random(f"{seed}/{tenant_id}")
    for i in range(count):
        otype = _TYPES[i % len(_TYPES)]
        company = rng.choice(_COMPANIES)
        person = rng.choice(_NAMES)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        fields = {
            "Name": f"{company} {otype} {i}",
            "Subject": f"{rng.choice(_WORDS).title()} for {company}",
            "Description": f"{person} wrote: {words}",
            "Owner": person,
            "Amount": rng.randint(100, 250_000) if otype == "Opportunity" else None,
            "Status": rng.choice(("New", "Open", "Closed", "Escalated")),
        }
        rid = _record_id(
            rng, {"Account": "001", "Contact": "003", "Case": "500", "Opportunity": "006", "EmailMessage": "02s"}[otype]
        )
        attachments: list[AttachmentData] = []
        while rng.random() < mix.attachment_probability and len(attachments) < 3:
            r, acc = rng.random(), 0.0
            lo, hi = mix.bands[-1][1:]
            for weight, blo, bhi in mix.bands:
                acc += weight
                if r <= acc:
                    lo, hi = blo, bhi
                    break
            size = rng.randint(lo, hi)
            aid = _record_id(rng, "00P")
            ref = AttachmentRef(aid, f"{rng.choice(_WORDS)}-{i}.pdf", size, "application/pdf")
            s = f"{seed}/{tenant_id}/{aid}".encode()
            attachments.append(AttachmentData(ref, functools.partial(keystream, s, size)))
        ws = f"ws{i % workspaces}" if workspaces > 1 else "default"
        yield Record(otype, rid, fields, tuple(a.ref for a in attachments), ws), attachments
