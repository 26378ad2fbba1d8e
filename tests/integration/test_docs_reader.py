"""A second implementation, written from the docs alone, reads our own data (issue 10,
defect 7): the stored keychain from the SQLite state store, the L2 through LocalStack
KMS, the L3 and L4 wraps, and every archived object from S3.

The reader below uses sqlite3, boto3 and ``cryptography`` only. Every constant it needs
is *parsed out of the markdown* (``docs/key-hierarchy.md`` section 2a,
``docs/envelope-format.md``, ``docs/storage-layout.md``) rather than typed here, so a
doc that drifts from the code breaks this test. Project code is imported only to set up
the data (a tenant under the managed key, an archive job) and to say what the plaintext
must be.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import struct
import uuid
from urllib.parse import unquote_to_bytes

import boto3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from archive_kms.config import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"


# --- constants, from the docs --------------------------------------------------------------


class Spec:
    """What the docs say, parsed."""

    def __init__(self) -> None:
        kh = (DOCS / "key-hierarchy.md").read_text()
        env = (DOCS / "envelope-format.md").read_text()
        layout = (DOCS / "storage-layout.md").read_text()
        section = kh[kh.index("## 2a.") : kh.index("## 3.")]

        self.wrap_label = re.search(r'^label = "([^"]+)"$', section, re.M).group(1).encode("ascii")
        self.aad_fields = re.findall(r"^\d+\. `(\w+)`$", section, re.M)
        self.record_format = re.search(r"\| `format` \| string \| `([^`]+)` \|", section).group(1)
        self.wrap_algorithm = re.search(r"L3/L4: `(\w+)` \|", section).group(1)
        self.head_l2 = "l2" if "`l2` (the array `[record_id" in section else None
        nonce_tag = re.search(r"`nonce \((\d+)\) \|\| ciphertext \((\d+)\) \|\| tag \((\d+)\)`", section)
        self.wrap_nonce, self.key_len, self.tag_len = (int(x) for x in nonce_tag.groups())
        assert "standard base64 with padding" in section
        self.kms_context_key = re.search(r'EncryptionContext=\{"(\w+)": <tenant id>\}', section).group(1)
        self.canonical = dict(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        assert 'separators=(",", ":"), ensure_ascii=True, allow_nan=False' in section

        header = {
            m.group(3): (m.group(1), m.group(2)) for m in re.finditer(r"^\| (\S+) \| (\S+) \| `(\w+)`", env, re.M)
        }
        self.magic = re.search(r"ASCII `(\w{4})` \(", env).group(1).encode("ascii")
        self.off_version, self.off_header_len = int(header["version"][0]), int(header["header_len"][0])
        self.off_segment, self.len_segment = int(header["segment_size"][0]), int(header["segment_size"][1])
        self.off_salt, self.len_salt = int(header["salt"][0]), int(header["salt"][1])
        self.off_prefix, self.len_prefix = int(header["nonce_prefix"][0]), int(header["nonce_prefix"][1])
        self.off_t = int(re.search(r"^\| (\d+) \| 1 \| `t` = len", env, re.M).group(1))
        self.object_label = re.search(r'^info    = "([^"]+)" \|\| context', env, re.M).group(1).encode("ascii")
        assert "context = u32(len(tenant)) || tenant || u32(len(object_name)) || object_name" in env
        assert "nonce(i, final) = nonce_prefix (7 bytes) || u32(i) || (0x01 if final else 0x00)" in env
        assert "AAD = header (all header_len bytes, as stored) || context" in env
        self.gcm_tag = int(re.search(r"followed by its (\d+)-byte tag", env).group(1))
        assert "`u8`, `u16`, `u32` are unsigned big-endian integers" in env

        self.safe = re.search(r"every byte outside \[([^\]]+)\] -> %XX", layout).group(1)
        self.shared_prefix = re.search(r"\| shared S3 prefix \| `([^`]+)` \|", layout).group(1)


def lp(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">I", len(data)) + data


class DocsReader:
    """Reads a tenant's keys and objects the way the docs describe, nothing else."""

    def __init__(self, spec: Spec, db_path: str, kms, s3) -> None:
        self.spec, self.db, self.kms, self.s3 = spec, sqlite3.connect(db_path), kms, s3

    def rows(self, tenant: str) -> tuple[dict, dict[str, dict]]:
        (head,) = self.db.execute("SELECT body FROM keychain_heads WHERE tenant_id = ?", (tenant,)).fetchone()
        records = {}
        for (body,) in self.db.execute("SELECT body FROM keychain_records WHERE tenant_id = ?", (tenant,)):
            rec = json.loads(body)
            # the stored bytes are the canonical JSON the docs define
            assert json.dumps(rec, **self.spec.canonical).encode("ascii") == bytes(body)
            assert rec["format"] == self.spec.record_format
            records[rec["record_id"]] = rec
        return json.loads(head), records

    def aad(self, rec: dict) -> bytes:
        out = self.spec.wrap_label
        for name in self.spec.aad_fields:
            value = rec[name]
            out += lp(str(value) if isinstance(value, int) else value)
        return out

    def open_wrap(self, parent_key: bytes, rec: dict) -> bytes:
        assert rec["wrap_algorithm"] == self.spec.wrap_algorithm
        blob = base64.b64decode(rec["wrapped"], validate=True)
        n = self.spec.wrap_nonce
        assert len(blob) == n + self.spec.key_len + self.spec.tag_len
        return AESGCM(parent_key).decrypt(blob[:n], blob[n:], self.aad(rec))

    def keys(self, tenant: str) -> dict[str, bytes]:
        """Every live key of the tenant by record id."""
        head, records = self.rows(tenant)
        l2 = records[head[self.spec.head_l2][0]]
        arn = l2["wrap_ref"].removeprefix("aws-kms://")
        answer = self.kms.decrypt(
            KeyId=arn,
            CiphertextBlob=base64.b64decode(l2["wrapped"], validate=True),
            EncryptionContext={self.spec.kms_context_key: tenant},
            EncryptionAlgorithm="SYMMETRIC_DEFAULT",
        )
        keys = {l2["record_id"]: answer["Plaintext"]}
        for level in ("L3", "L4"):
            for rec in records.values():
                if rec["level"] == level and rec["state"] != "destroyed":
                    keys[rec["record_id"]] = self.open_wrap(keys[rec["parent_id"]], rec)
        return keys

    def decode_key(self, prefix: str, key: str) -> bytes:
        assert key.startswith(prefix)
        encoded = key[len(prefix) :]
        assert re.fullmatch(rf"(?:[{self.spec.safe}]|%[0-9A-F]{{2}})+", encoded), encoded
        return unquote_to_bytes(encoded)

    def decrypt(self, tenant: str, name: bytes, blob: bytes, deks: dict[str, bytes]) -> bytes:
        s = self.spec
        assert blob[:4] == s.magic and blob[s.off_version] == 1
        header_len = struct.unpack(">H", blob[s.off_header_len : s.off_header_len + 2])[0]
        segment = struct.unpack(">I", blob[s.off_segment : s.off_segment + s.len_segment])[0]
        salt = blob[s.off_salt : s.off_salt + s.len_salt]
        prefix = blob[s.off_prefix : s.off_prefix + s.len_prefix]
        pos, strings = s.off_t, []
        for _ in range(3):  # tenant_id, workspace_id, dek_id: each a u8 length then UTF-8
            n = blob[pos]
            strings.append(blob[pos + 1 : pos + 1 + n].decode("utf-8"))
            pos += 1 + n
        assert pos == header_len and strings[0] == tenant
        header, body = blob[:header_len], blob[header_len:]
        context = lp(tenant) + struct.pack(">I", len(name)) + name
        key = HKDF(hashes.SHA256(), 32, salt=salt, info=s.object_label + context).derive(deks[strings[2]])
        aead, out, i = AESGCM(key), b"", 0
        step = segment + s.gcm_tag
        while True:
            chunk = body[i * step : (i + 1) * step]
            final = (i + 1) * step >= len(body)
            nonce = prefix + struct.pack(">I", i) + (b"\x01" if final else b"\x00")
            out += aead.decrypt(nonce, chunk, header + context)
            if final:
                return out
            i += 1


def test_a_reader_written_from_the_docs_decrypts_the_keychain_and_every_object(localstack, elasticsearch, tmp_path):
    # --- set up the data with the project -----------------------------------------------------
    from archive_kms.operations.archive import JobSpec, submit_job
    from archive_kms.operations.platform import Platform
    from archive_kms.operations.tenants import create_tenant

    db = tmp_path / "state.db"
    settings = localstack.model_copy(update={"state_url": f"sqlite:///{db}"})
    platform = Platform.from_settings(settings)
    tenant = f"dr{uuid.uuid4().hex[:8]}"
    create_tenant(platform, tenant, cloud="s3", actor="test")
    spec = JobSpec(f"{tenant}-1", tenant, "synthetic", synthetic={"count": 6, "seed": 9, "workspaces": 2})
    assert submit_job(platform.state, spec, platform.open_archive).decision == "run"
    expected: dict[bytes, bytes] = {}
    for record, attachments in spec.materialise():
        expected[f"records/{record.workspace_id}/{record.object_type}/{record.record_id}".encode()] = record.to_json()
        for att in attachments:
            expected[f"attachments/{record.workspace_id}/{att.ref.attachment_id}".encode()] = b"".join(att.open())

    # --- read it back from the docs alone -------------------------------------------------------
    docs = Spec()
    assert docs.aad_fields == [
        "tenant_id",
        "level",
        "workspace_id",
        "record_id",
        "generation",
        "parent_id",
        "parent_version",
    ]
    client = dict(
        endpoint_url=settings.aws_endpoint_url,
        region_name=settings.aws_region,
        aws_access_key_id=settings.aws_access_key_id.get_secret_value(),
        aws_secret_access_key=settings.aws_secret_access_key.get_secret_value(),
    )
    reader = DocsReader(docs, str(db), boto3.client("kms", **client), boto3.client("s3", **client))
    keys = reader.keys(tenant)
    assert sum(1 for k in keys if k.startswith("l4/")) >= 2  # two workspaces, a DEK each

    prefix = docs.shared_prefix.replace("<id>", tenant)
    listed = reader.s3.list_objects_v2(Bucket=settings.shared_bucket, Prefix=prefix)["Contents"]
    seen = {}
    for obj in listed:
        name = reader.decode_key(prefix, obj["Key"])
        blob = reader.s3.get_object(Bucket=settings.shared_bucket, Key=obj["Key"])["Body"].read()
        seen[name] = reader.decrypt(tenant, name, blob, keys)
    assert seen == expected
