"""Generate ``tests/vectors/data/envelope_v1.json``: known-answer and tampered envelope vectors.

Deterministic: keys, salts, nonce prefixes and plaintexts are derived from fixed labels,
and encryption goes through the private hook ``_encrypt_iter_with`` (production code
always draws a random salt and nonce prefix). Tampered vectors are built here by editing
bytes, with an independent header encoder written from ``docs/envelope-format.md``.

    .venv/bin/python tests/vectors/generate_envelope_vectors.py           # rewrite the file
    .venv/bin/python tests/vectors/generate_envelope_vectors.py --check   # exit 1 if stale
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

from archive_kms.crypto.envelope import TAG_SIZE, ObjectBinding, _encrypt_iter_with
from archive_kms.crypto.secrets import SecretBytes

OUT = Path(__file__).parent / "data" / "envelope_v1.json"
PLAINTEXT_RULE = "plaintext = SHAKE-256(b'archive_kms/vectors/plaintext').digest(plaintext_size)"
SEG = 4096


def _h(label: str) -> bytes:
    return hashlib.sha256(b"archive_kms/vectors/" + label.encode()).digest()


def plaintext(size: int) -> bytes:
    return hashlib.shake_256(b"archive_kms/vectors/plaintext").digest(size)


DEK_A = _h("dek-a")
DEK_B = _h("dek-b")
TENANT = "tenant-a"
WORKSPACE = "ws-1"
DEK_ID = "ws-1/2025-01-01T10/v1"
NAME = b"records/2025/01/01/0001.json"


def raw_header(
    *,
    tenant: bytes,
    workspace: bytes,
    dek_id: bytes,
    salt: bytes,
    nonce_prefix: bytes,
    segment_size: int = SEG,
    magic: bytes = b"AKMS",
    version: int = 1,
    header_len: int | None = None,
    lengths: tuple[int, int, int] | None = None,
    extra: bytes = b"",
) -> bytes:
    """The header exactly as the spec lays it out; every field can be forced to a bad value."""
    strings = (tenant, workspace, dek_id)
    lengths = lengths or tuple(len(s) for s in strings)
    body = struct.pack(">I32s7s", segment_size, salt, nonce_prefix)
    body += b"".join(bytes([n]) + s for n, s in zip(lengths, strings)) + extra
    if header_len is None:
        header_len = 7 + len(body)
    return struct.pack(">4sBH", magic, version, header_len) + body


def encrypt(
    size: int,
    *,
    label: str,
    dek: bytes = DEK_A,
    tenant: str = TENANT,
    workspace: str = WORKSPACE,
    dek_id: str = DEK_ID,
    name: bytes = NAME,
    segment_size: int = SEG,
) -> tuple[bytes, dict]:
    salt, nonce_prefix = _h("salt/" + label), _h("nonce/" + label)[:7]
    binding = ObjectBinding(tenant, workspace, name)
    ct = b"".join(
        _encrypt_iter_with(
            [plaintext(size)],
            dek=SecretBytes(dek),
            dek_id=dek_id,
            binding=binding,
            segment_size=segment_size,
            salt=salt,
            nonce_prefix=nonce_prefix,
        )
    )
    header = raw_header(
        tenant=tenant.encode(),
        workspace=workspace.encode(),
        dek_id=dek_id.encode(),
        salt=salt,
        nonce_prefix=nonce_prefix,
        segment_size=segment_size,
    )
    assert ct.startswith(header), "implementation header differs from the spec encoder"
    info = {
        "dek": dek.hex(),
        "dek_id": dek_id,
        "tenant_id": tenant,
        "workspace_id": workspace,
        "object_name": name.hex(),
        "segment_size": segment_size,
        "salt": salt.hex(),
        "nonce_prefix": nonce_prefix.hex(),
        "header_len": len(header),
        "plaintext_size": size,
        "plaintext_sha256": hashlib.sha256(plaintext(size)).hexdigest(),
    }
    return ct, info


def _valid(vid: str, description: str, size: int, **kw: object) -> dict:
    ct, info = encrypt(size, label=vid, **kw)  # type: ignore[arg-type]
    return {"id": vid, "description": description, "result": "valid", **info, "ciphertext": ct.hex()}


def _invalid(
    vid: str,
    description: str,
    ciphertext: bytes,
    error: str,
    error_contains: str,
    *,
    tenant: str = TENANT,
    workspace: str = WORKSPACE,
    name: bytes = NAME,
    dek: bytes = DEK_A,
) -> dict:
    return {
        "id": vid,
        "description": description,
        "result": "invalid",
        "error": error,
        "error_contains": error_contains,
        "dek": dek.hex(),
        "tenant_id": tenant,
        "workspace_id": workspace,
        "object_name": name.hex(),
        "ciphertext": ciphertext.hex(),
    }


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def build() -> dict:
    vectors = [
        _valid("empty", "0 bytes: exactly one empty final segment", 0),
        _valid("one-byte", "1 byte", 1),
        _valid("segment-minus-1", "segment_size - 1 bytes: one short final segment", SEG - 1),
        _valid("segment", "exactly one full segment, which is final", SEG),
        _valid("segment-plus-1", "one full segment then a 1-byte final segment", SEG + 1),
        _valid("three-segments-exact", "three full segments, the third final", 3 * SEG),
        _valid("three-segments-partial", "two full segments and a partial final one", 2 * SEG + 100),
        _valid(
            "default-segment-size",
            "1 MiB segment size, small object, Unicode workspace, opaque non-UTF-8 object name",
            1000,
            segment_size=1024 * 1024,
            workspace="werkstätte-ü",
            name=b"../\x00\xff%2e%2e/attachment",
        ),
    ]

    # Reference objects for tampering: R has 3 segments (last partial), F has 2 full segments.
    r, ri = encrypt(2 * SEG + 100, label="reference")
    x, _ = encrypt(2 * SEG + 100, label="other-object", name=b"records/2025/01/01/0002.json")
    f, _ = encrypt(2 * SEG, label="full-final")
    e, _ = encrypt(0, label="empty-reference")
    w, _ = encrypt(2 * SEG + 100, label="reference", dek=DEK_B)
    hl = ri["header_len"]
    seg = SEG + TAG_SIZE
    hdr, s0, s1, s2 = r[:hl], r[hl : hl + seg], r[hl + seg : hl + 2 * seg], r[hl + 2 * seg :]
    salt, nonce = bytes.fromhex(ri["salt"]), bytes.fromhex(ri["nonce_prefix"])
    fields = {"tenant": TENANT.encode(), "workspace": WORKSPACE.encode(), "dek_id": DEK_ID.encode()}

    def header(**kw: object) -> bytes:
        return raw_header(**{**fields, "salt": salt, "nonce_prefix": nonce, **kw})  # type: ignore[arg-type]

    body_stub = s0[:32]  # header-format vectors fail before any segment is read
    integrity, fmt = "IntegrityError", "FormatError"
    seg_fail = "segment {} failed authentication"
    vectors += [
        # binding
        _invalid(
            "wrong-tenant",
            "valid object, caller expects another tenant",
            r,
            integrity,
            "bound to another tenant",
            tenant="tenant-b",
        ),
        _invalid(
            "wrong-workspace",
            "valid object, caller expects another workspace",
            r,
            integrity,
            "bound to another workspace",
            workspace="ws-2",
        ),
        _invalid(
            "wrong-object-name",
            "valid object moved to another name",
            r,
            integrity,
            seg_fail.format(0),
            name=b"records/2025/01/01/0003.json",
        ),
        _invalid(
            "header-tenant-rewritten",
            "object moved to tenant-b with its header rewritten to match",
            header(tenant=b"tenant-b") + r[hl:],
            integrity,
            seg_fail.format(0),
            tenant="tenant-b",
        ),
        _invalid(
            "header-swapped",
            "header of another object of the same tenant + this object's body",
            x[:hl] + r[hl:],
            integrity,
            seg_fail.format(0),
        ),
        _invalid(
            "segment-from-other-object",
            "segment 1 replaced by segment 1 of another object",
            hdr + s0 + x[hl + seg : hl + 2 * seg] + s2,
            integrity,
            seg_fail.format(1),
        ),
        _invalid("wrong-dek", "encrypted under another DEK with the same dek_id", w, integrity, seg_fail.format(0)),
        # bit flips
        _invalid("flip-salt", "one bit of the salt flipped", _flip(r, 8 * 11), integrity, seg_fail.format(0)),
        _invalid(
            "flip-nonce-prefix",
            "one bit of the nonce prefix flipped",
            _flip(r, 8 * 43 + 7),
            integrity,
            seg_fail.format(0),
        ),
        _invalid(
            "flip-dek-id",
            "one bit of the dek_id flipped (still printable)",
            _flip(r, 8 * (hl - 1)),
            integrity,
            seg_fail.format(0),
        ),
        _invalid(
            "flip-body",
            "one bit flipped in segment 1's ciphertext",
            _flip(r, 8 * (hl + seg + 100)),
            integrity,
            seg_fail.format(1),
        ),
        _invalid(
            "flip-last-tag",
            "last bit of the final tag flipped",
            _flip(r, 8 * len(r) - 1),
            integrity,
            seg_fail.format(2),
        ),
        # truncation
        _invalid("truncated-empty", "empty input", b"", fmt, "header truncated"),
        _invalid("truncated-in-header", "cut inside the header", r[: hl - 1], fmt, "header truncated"),
        _invalid(
            "truncated-after-header", "cut at the segment 0 boundary", hdr, integrity, "no segment after the header"
        ),
        _invalid(
            "truncated-after-segment-0",
            "cut at the segment 1 boundary",
            hdr + s0,
            integrity,
            "final segment missing (stream ends after segment 0)",
        ),
        _invalid(
            "truncated-after-segment-1",
            "cut at the segment 2 boundary",
            hdr + s0 + s1,
            integrity,
            "final segment missing (stream ends after segment 1)",
        ),
        _invalid("truncated-inside-final", "final segment cut short", r[:-1], integrity, seg_fail.format(2)),
        _invalid(
            "truncated-inside-tag",
            "final segment shorter than a tag",
            hdr + s0 + s1 + s2[:10],
            integrity,
            "less than a tag",
        ),
        _invalid(
            "truncated-empty-object",
            "empty object without its only segment",
            e[: len(e) - TAG_SIZE],
            integrity,
            "no segment after the header",
        ),
        # reordering, duplication, extension
        _invalid("segments-swapped", "segments 0 and 1 swapped", hdr + s1 + s0 + s2, integrity, seg_fail.format(0)),
        _invalid("segment-duplicated", "segment 0 repeated", hdr + s0 + s0 + s1 + s2, integrity, seg_fail.format(1)),
        _invalid(
            "extended-byte",
            "one byte appended (lengthens the final segment)",
            r + b"\x00",
            integrity,
            seg_fail.format(2),
        ),
        _invalid(
            "trailing-after-full-final",
            "one byte after a full final segment",
            f + b"\x00",
            integrity,
            "trailing data after final segment 1",
        ),
        _invalid(
            "trailing-segment",
            "a copy of the final segment appended",
            f + f[-seg:],
            integrity,
            "trailing data after final segment 1",
        ),
        # header format: bounds checked before anything is read or allocated
        _invalid("bad-magic", "magic AKMX", b"AKMX" + r[4:], fmt, "bad magic"),
        _invalid("zero-magic", "magic 00000000", b"\x00" * 4 + r[4:], fmt, "bad magic"),
        _invalid("version-0", "version 0", header(version=0) + body_stub, fmt, "unsupported envelope version 0"),
        _invalid("version-2", "version 2", header(version=2) + body_stub, fmt, "unsupported envelope version 2"),
        _invalid(
            "version-255", "version 255", header(version=255) + body_stub, fmt, "unsupported envelope version 255"
        ),
        _invalid(
            "header-len-65535",
            "header_len 0xffff",
            header(header_len=0xFFFF) + body_stub,
            fmt,
            "header_len 65535 out of bounds",
        ),
        _invalid(
            "header-len-1025",
            "header_len just over 1 KiB",
            header(header_len=1025) + body_stub,
            fmt,
            "header_len 1025 out of bounds",
        ),
        _invalid(
            "header-len-too-small",
            "header_len below the fixed part",
            header(header_len=49) + body_stub,
            fmt,
            "header_len 49 out of bounds",
        ),
        _invalid(
            "header-len-short",
            "header_len one byte short of its fields",
            header(header_len=hl - 1) + r[hl:],
            fmt,
            "overruns header_len",
        ),
        _invalid(
            "header-trailing-byte",
            "one extra byte inside the header",
            header(extra=b"\x00") + r[hl:],
            fmt,
            "1 trailing byte(s)",
        ),
        _invalid(
            "tenant-len-255",
            "tenant length byte 255",
            header(lengths=(255, 4, len(DEK_ID))) + body_stub,
            fmt,
            "tenant_id length 255 out of bounds",
        ),
        _invalid(
            "tenant-len-64",
            "tenant length 64 (> 63)",
            header(tenant=b"t" * 64) + body_stub,
            fmt,
            "tenant_id length 64 out of bounds",
        ),
        _invalid(
            "tenant-len-0", "empty tenant", header(tenant=b"") + body_stub, fmt, "tenant_id length 0 out of bounds"
        ),
        _invalid(
            "workspace-len-129",
            "workspace length 129",
            header(workspace=b"w" * 129) + body_stub,
            fmt,
            "workspace_id length 129 out of bounds",
        ),
        _invalid(
            "dek-id-len-129",
            "dek_id length 129",
            header(dek_id=b"d" * 129) + body_stub,
            fmt,
            "dek_id length 129 out of bounds",
        ),
        _invalid(
            "workspace-bad-utf8",
            "workspace is not UTF-8",
            header(workspace=b"ws\xff1") + body_stub,
            fmt,
            "workspace_id is not valid UTF-8",
        ),
        _invalid(
            "tenant-control-char",
            "tenant contains a newline",
            header(tenant=b"tenant\na") + body_stub,
            fmt,
            "invalid header field",
        ),
        _invalid(
            "segment-size-0", "segment_size 0", header(segment_size=0) + body_stub, fmt, "segment_size 0 out of bounds"
        ),
        _invalid(
            "segment-size-4095",
            "segment_size 4 KiB - 1",
            header(segment_size=4095) + body_stub,
            fmt,
            "segment_size 4095 out of bounds",
        ),
        _invalid(
            "segment-size-16MiB-plus-1",
            "segment_size 16 MiB + 1",
            header(segment_size=16 * 2**20 + 1) + body_stub,
            fmt,
            "segment_size 16777217 out of bounds",
        ),
        _invalid(
            "segment-size-max",
            "segment_size 0xffffffff",
            header(segment_size=0xFFFFFFFF) + body_stub,
            fmt,
            "segment_size 4294967295 out of bounds",
        ),
    ]
    return {
        "format": "archive_kms envelope version 1 (docs/envelope-format.md)",
        "generator": "tests/vectors/generate_envelope_vectors.py",
        "plaintext_rule": PLAINTEXT_RULE,
        "notes": "Header-format vectors carry only 32 body bytes: parsing must fail on the header.",
        "vectors": vectors,
    }


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUT.read_text() != text:
            print(f"{OUT} is stale; rerun without --check", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(build()['vectors'])} vectors)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
