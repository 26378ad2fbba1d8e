"""In-memory ObjectStore: a real implementation of the port contract, for unit tests and
fakes. It keeps objects under the same encoded keys as the cloud adapters, so name
handling, prefixes and conditional creates behave identically; uploads are staged
(visible through ``pending_uploads``) and committed atomically under a lock.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from archive_kms.errors import ObjectChangedError, ObjectExistsError, ObjectNotFoundError
from archive_kms.storage.naming import decode_key, encode_prefix, object_key
from archive_kms.storage.port import (
    DEFAULT_PART_SIZE,
    ObjectInfo,
    ObjectReader,
    PendingUpload,
    check_part_size,
    iter_parts,
    part_size_for,
    same_etag,
    validate_metadata,
)

log = logging.getLogger(__name__)


@dataclass
class _Object:
    parts: list[bytes]
    size: int
    etag: str
    metadata: dict[str, str]
    last_modified: datetime


@dataclass
class _Upload:
    key: str
    initiated: datetime
    parts: list[bytes] = field(default_factory=list)


class MemoryObjectStore:
    """Objects in a dict, keyed like the cloud adapters key them (``prefix + encode(name)``)."""

    def __init__(
        self,
        *,
        prefix: str = "memory/",
        part_size: int = DEFAULT_PART_SIZE,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._prefix = prefix
        self._part_size = check_part_size(part_size)
        self._clock = clock
        self._lock = threading.Lock()
        self._objects: dict[str, _Object] = {}
        self._uploads: dict[str, _Upload] = {}
        self._etags = itertools.count(1)

    @property
    def label(self) -> str:
        return f"memory://{self._prefix}"

    def raw_keys(self) -> list[str]:
        """Backend keys, for tests that check where names land."""
        with self._lock:
            return sorted(self._objects)

    # --- writes --------------------------------------------------------------------------

    def begin_upload(self, name: bytes) -> tuple[str, _Upload]:
        """Start a staged upload (what ``put_stream`` does first). Exposed so tests can
        abandon one, as a crashed writer would."""
        key = object_key(self._prefix, name)
        upload = _Upload(key=key, initiated=self._clock())
        upload_id = uuid.uuid4().hex
        with self._lock:
            self._uploads[upload_id] = upload
        return upload_id, upload

    def put_stream(
        self,
        name: bytes,
        chunks: Iterable[bytes],
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        meta = validate_metadata(metadata)
        key = object_key(self._prefix, name)
        if if_absent and self.head(name) is not None:  # early exit; the commit below decides
            raise ObjectExistsError(f"{self.label}: object {key!r} already exists", resource=key)
        upload_id, upload = self.begin_upload(name)
        try:
            digest = hashlib.sha256()
            for part, _ in iter_parts(chunks, lambda i: part_size_for(i, self._part_size, tier=10_000)):
                digest.update(part)
                if part:
                    upload.parts.append(part)
            size = sum(len(p) for p in upload.parts)
            etag = f'"{digest.hexdigest()[:32]}"'  # of the content, as S3's single-part ETag
            with self._lock:
                if if_absent and key in self._objects:
                    raise ObjectExistsError(f"{self.label}: object {key!r} already exists", resource=key)
                self._objects[key] = _Object(upload.parts, size, etag, meta, self._clock())
            return ObjectInfo(
                name, size, etag, dict(meta), self._objects[key].last_modified, checksum="sha256:" + digest.hexdigest()
            )
        finally:
            with self._lock:
                self._uploads.pop(upload_id, None)

    def delete(self, name: bytes) -> None:
        key = object_key(self._prefix, name)
        with self._lock:
            self._objects.pop(key, None)

    def delete_many(self, names: Iterable[bytes]) -> int:
        count = 0
        for name in names:
            self.delete(name)
            count += 1
        return count

    # --- reads ---------------------------------------------------------------------------

    def _get(self, name: bytes) -> tuple[str, _Object | None]:
        key = object_key(self._prefix, name)
        with self._lock:
            return key, self._objects.get(key)

    def head(self, name: bytes) -> ObjectInfo | None:
        _, obj = self._get(name)
        if obj is None:
            return None
        return ObjectInfo(name, obj.size, obj.etag, dict(obj.metadata), obj.last_modified)

    def open_read(self, name: bytes, *, if_match: str | None = None) -> ObjectReader:
        key, obj = self._get(name)
        if obj is None:
            raise ObjectNotFoundError(f"{self.label}: no object {key!r}", resource=key)
        if if_match is not None and not same_etag(obj.etag, if_match):
            raise ObjectChangedError(f"{self.label}: {key!r} is not the version {if_match}", resource=key)
        info = ObjectInfo(name, obj.size, obj.etag, dict(obj.metadata), obj.last_modified)
        # The parts list is never mutated after commit, so the reader sees one version.
        return ObjectReader(info, iter(obj.parts), label=f"{self.label}{key}")

    def list(self, prefix: bytes = b"") -> Iterator[ObjectInfo]:
        key_prefix = self._prefix + encode_prefix(prefix)
        with self._lock:
            snapshot = sorted((k, o) for k, o in self._objects.items() if k.startswith(key_prefix))
        for key, obj in snapshot:
            name = decode_key(self._prefix, key)
            if name is None:  # pragma: no cover - we only store keys we encoded
                log.warning("%s: skipping foreign key %r", self.label, key)
                continue
            yield ObjectInfo(name, obj.size, obj.etag, None, obj.last_modified)

    # --- uploads -------------------------------------------------------------------------

    def pending_uploads(self) -> Iterator[PendingUpload]:
        with self._lock:
            items = list(self._uploads.items())
        for upload_id, up in items:
            yield PendingUpload(decode_key(self._prefix, up.key), up.key, upload_id, up.initiated)

    def abort_stale_uploads(self, older_than: timedelta, *, now: datetime | None = None) -> int:
        horizon = (now or self._clock()) - older_than
        with self._lock:
            stale = [uid for uid, up in self._uploads.items() if up.initiated <= horizon]
            for uid in stale:
                del self._uploads[uid]
        return len(stale)
