"""The ObjectStore port: one tenant's objects in one location.

One adapter per backend (``s3``, ``azure_blob``, ``memory``); ``locations.open_store``
builds the right one from a ``Location``. ``tests/contract/test_object_store_contract.py``
holds every adapter, real and fake, to the rules written here.

Contract
--------
- **Names are opaque bytes** (1..~980 bytes, see ``storage.naming``), scoped inside the
  store's location. The adapter maps a name to ``<location prefix> + encode(name)``; no
  name can reach a key outside the location, and ``list`` returns the names it was given.
  An empty, non-bytes or too-long name raises ``ValidationError`` before any request.
- **put_stream** consumes ``chunks`` once, in order, in the calling thread, and keeps a
  bounded number of parts (``part_size``, default 8 MiB; S3 multipart parts / Azure
  staged blocks) in memory whatever the object size: the part being cut from the stream
  plus at most ``parts_in_flight`` (default 4) parts uploading in the adapter's threads,
  i.e. ``(parts_in_flight + 1) x part_size`` per call. Parts handed to those threads are
  also charged to the store's ``PartBudget`` (``upload_buffer``, default 64 MiB, shared
  by every call on the store): a part that does not fit is uploaded by the calling thread
  itself, so the store holds at most ``upload_buffer + (calls in progress) x part_size``
  of parts. Nothing is visible under ``name`` until the upload commits; on any failure
  the adapter lets the parts already sent finish, aborts what it started (S3:
  AbortMultipartUpload; Azure: uncommitted blocks are never committed and use block ids
  unique to the attempt, so a later attempt never mixes them in) and re-raises.
  ``if_absent=True`` makes the commit conditional on no object existing (S3
  ``If-None-Match: *`` on PutObject / CompleteMultipartUpload; Azure ``If-None-Match:
  *``): if one exists, nothing is changed and ``ObjectExistsError`` is raised. That includes an object written by an
  earlier attempt whose response was lost (even an SDK-internal retry of this call), so
  callers that get ``ObjectExistsError`` on a retry verify the content (faults A7).
  ``metadata`` keys are ``[a-z][a-z0-9_]*``, values printable ASCII (see
  ``validate_metadata``). Returns the committed object's ``ObjectInfo``.
  The returned ``ObjectInfo.checksum`` names the checksum of the committed bytes that
  the *store validated on receipt* (S3: ``x-amz-checksum-sha256`` on PutObject and on
  every UploadPart, ``sha256:<base64>`` or the multipart composite
  ``sha256-composite:<base64>-<parts>``; Azure: the transactional ``Content-MD5`` of Put
  Blob, ``md5:<base64>``, or of every Put Block, ``md5-blocks:<base64>-<blocks>``, the MD5
  of the blocks' MD5s in order). The adapter computes it from the bytes it sends, the
  store refuses a request whose body does not match (``BadDigest`` / ``Md5Mismatch``,
  retryable), and the adapter checks the store's echo of it: a write that returns has been
  stored as exactly the bytes the caller's ``chunks`` produced (ADR 0018).
- **open_read** returns an ``ObjectReader`` (a binary file object whose iteration yields
  chunks) over the object as it was when opened; if it changes or is cut short mid-read
  the reader raises (never returns a silently truncated or mixed body). Missing object:
  ``ObjectNotFoundError``. ``if_match=etag`` reads only that version (S3 ``If-Match``;
  Azure: the ETag compared before the first range, which is itself conditioned on it): any
  other version raises ``ObjectChangedError`` before a byte is returned.
- **head** returns ``ObjectInfo`` with metadata, or ``None`` if there is no object.
- **delete** removes the object; deleting a missing object is not an error (retried
  cleanups converge). **delete_many** does the same for many names with as few requests
  as the backend allows (S3 ``DeleteObjects``, 1,000 keys a request; Azure blob batch,
  256 a request) and returns how many names it was given.
- **list** yields every committed object whose *name* starts with ``prefix``, each once,
  with ``metadata=None`` (not fetched; use ``head``), in backend key order (not name
  order). Pages are followed to the end; a page failure raises, never skips. Keys under
  the location that the adapter did not write (not canonically encoded) are skipped
  with a warning.
- **pending_uploads** lists started-but-uncommitted uploads (S3 multipart uploads, Azure
  blobs with only uncommitted blocks) in the location; **abort_stale_uploads** removes
  those started more than ``older_than`` ago and returns how many it removed.

Errors: ``ObjectNotFoundError``, ``ObjectExistsError``, ``ObjectChangedError``, ``ValidationError``;
``ServiceUnavailableError`` / ``TransientError`` (throttling, 5xx, resets, timeouts,
conflicting concurrent writes: retry the whole call). Each request has already been
retried with backoff inside the adapter (botocore's retries on S3, ``AzureRetry`` on Azure,
which also honours ``Retry-After``) before one of these reaches the caller, so the caller's
retry is a later one (a task retry, a rerun), not a tight loop (faults A1/A2);
``StorageError`` (permission, missing bucket/container: a human must act);
``KeyUnavailableError`` when the location's server-side encryption key refuses. Every
message names the location and the key.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Generic, Protocol, TypeVar, runtime_checkable

from archive_kms.errors import TransientError, ValidationError

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
#: S3's smallest non-final part; we use it as the floor for every backend.
MIN_PART_SIZE = 5 * MiB
#: Parts of one object uploading at once (rclone's --s3-upload-concurrency default is 4 too).
DEFAULT_PARTS_IN_FLIGHT = 4
MAX_PARTS_IN_FLIGHT = 64
#: Bytes of parts a store's upload threads may hold, across every write on that store.
DEFAULT_UPLOAD_BUFFER = 64 * MiB
MAX_METADATA_BYTES = 2048
T = TypeVar("T")
_META_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,63}", re.ASCII)


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one committed object."""

    name: bytes
    size: int
    etag: str  # opaque; compare only with etags from the same store
    metadata: Mapping[str, str] | None = field(default=None, compare=False)  # None: not fetched (list)
    last_modified: datetime | None = field(default=None, compare=False)
    # What the store validated on receipt (put_stream only; None from head/list/open_read).
    checksum: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PendingUpload:
    """A started, uncommitted upload (crash leftovers and uploads in progress)."""

    name: bytes | None  # None if the backend key is not one we wrote
    key: str  # the raw backend key, for reports
    upload_id: str | None  # S3 UploadId; None on Azure
    initiated: datetime | None


@runtime_checkable
class ObjectStore(Protocol):
    """One location (a tenant's prefix or container). See the module contract."""

    @property
    def label(self) -> str:
        """The location as a URI for messages and reports (``s3://bucket/tenants/acme/``)."""
        ...

    def put_stream(
        self,
        name: bytes,
        chunks: Iterable[bytes],
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Stream ``chunks`` into ``name``; ``ObjectExistsError`` if ``if_absent`` and it exists."""
        ...

    def open_read(self, name: bytes, *, if_match: str | None = None) -> ObjectReader:
        """A streaming reader; ``ObjectNotFoundError`` if missing, ``ObjectChangedError``
        if ``if_match`` is given and the object's ETag is another."""
        ...

    def head(self, name: bytes) -> ObjectInfo | None:
        """Size, etag and metadata, or ``None`` if missing."""
        ...

    def delete(self, name: bytes) -> None:
        """Remove ``name``; a missing object is not an error."""
        ...

    def delete_many(self, names: Iterable[bytes]) -> int:
        """``delete`` each of ``names`` in batches; returns how many names were given."""
        ...

    def list(self, prefix: bytes = b"") -> Iterator[ObjectInfo]:
        """Every committed object whose name starts with ``prefix``, once each."""
        ...

    def pending_uploads(self) -> Iterator[PendingUpload]:
        """Started, uncommitted uploads in this location."""
        ...

    def abort_stale_uploads(self, older_than: timedelta, *, now: datetime | None = None) -> int:
        """Abort uploads started before ``now - older_than``; returns how many."""
        ...


def validate_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """User metadata that round-trips on every backend unchanged.

    Keys: ``[a-z][a-z0-9_]{0,63}`` (S3 lowercases keys; Azure needs identifiers). Values:
    printable ASCII without leading/trailing spaces (HTTP trims them). At most 2 KiB in
    total (S3's limit)."""
    if metadata is None:
        return {}
    out: dict[str, str] = {}
    total = 0
    for k, v in metadata.items():
        if not isinstance(k, str) or _META_KEY_RE.fullmatch(k) is None:
            raise ValidationError(f"metadata key {ascii(k)[:80]} must match [a-z][a-z0-9_]{{0,63}}")
        if not isinstance(v, str) or not v.isascii() or not v.isprintable() or v != v.strip(" "):
            raise ValidationError(f"metadata value for {k!r} must be printable ASCII without surrounding spaces")
        total += len(k) + len(v)
        out[k] = v
    if total > MAX_METADATA_BYTES:
        raise ValidationError(f"metadata is {total} bytes; the limit is {MAX_METADATA_BYTES}")
    return out


def check_part_size(part_size: int) -> int:
    """Fail at construction (not at the first upload) for a bad part size."""
    if isinstance(part_size, bool) or not isinstance(part_size, int) or not MIN_PART_SIZE <= part_size <= 512 * MiB:
        raise ValidationError(f"part_size must be an int in {MIN_PART_SIZE}..{512 * MiB} bytes, got {part_size!r}")
    return part_size


def part_size_for(index: int, base: int, *, tier: int, max_part: int = 512 * MiB) -> int:
    """Size of part ``index`` (0-based): ``base``, doubling every ``tier`` parts, capped.

    Streams have no known size, and S3 allows 10,000 parts (Azure 50,000 blocks): a fixed
    8 MiB part would cap objects at 78 GiB. Doubling keeps memory at one part for ordinary
    objects and only grows it for very large ones (S3: ~2.5 TiB with 8 MiB base)."""
    return min(base << (index // tier), max_part)


def iter_parts(chunks: Iterable[bytes], size_of: Callable[[int], int]) -> Iterator[tuple[bytes, bool]]:
    """Re-cut a chunk stream into ``(part, is_last)`` with parts of ``size_of(i)`` bytes
    (the last may be shorter; an empty stream yields ``(b"", True)``).

    ``is_last`` comes from looking one *chunk* ahead, not one part, so a caller can choose
    a single PUT or a multipart upload while holding at most one part plus one chunk."""
    it = iter(chunks)

    def next_view() -> memoryview | None:
        for chunk in it:
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise ValidationError(f"chunks must be bytes, got {type(chunk).__name__}")
            if len(chunk):
                return memoryview(chunk).cast("B")
        return None

    index = 0
    view = next_view()
    while True:
        want = size_of(index)
        buf = io.BytesIO()
        filled = 0
        while filled < want and view is not None:
            take = min(want - filled, len(view))
            buf.write(view[:take])
            filled += take
            view = view[take:] if take < len(view) else next_view()
        # getvalue() hands BytesIO's own buffer over (trimmed in place) when nothing else
        # refers to it: the part exists once, not as a buffer plus an immutable copy.
        part = buf.getvalue()
        del buf
        yield part, view is None
        del part  # not alive while the next part is built
        if view is None:
            return
        index += 1


def check_parts_in_flight(parts_in_flight: int) -> int:
    if (
        isinstance(parts_in_flight, bool)
        or not isinstance(parts_in_flight, int)
        or not 1 <= parts_in_flight <= MAX_PARTS_IN_FLIGHT
    ):
        raise ValidationError(f"parts_in_flight must be an int in 1..{MAX_PARTS_IN_FLIGHT}, got {parts_in_flight!r}")
    return parts_in_flight


class PartBudget:
    """Bytes of upload parts held by upload threads, capped across every write that
    shares the budget (each adapter instance has its own unless one is passed in).

    Never waited for: a part that does not fit is uploaded by its writer's own thread
    (the sequential way), so no writer blocks on another and memory stays at
    ``capacity`` plus one part per writer. ``capacity=0`` makes every upload sequential."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValidationError(f"upload_buffer must be an int >= 0 bytes, got {capacity!r}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._held = 0
        self._peak = 0

    @property
    def held(self) -> int:
        return self._held

    @property
    def peak(self) -> int:
        """The most ever held at once (for tests and diagnostics)."""
        return self._peak

    def try_take(self, nbytes: int) -> bool:
        with self._lock:
            if self._held + nbytes > self.capacity:
                return False
            self._held += nbytes
            self._peak = max(self._peak, self._held)
            return True

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


def same_etag(a: str | None, b: str | None) -> bool:
    """ETags compared as the stores give them, quoted or not (S3 listings and GETs quote
    them; some SDK paths strip the quotes)."""
    return a is not None and b is not None and a.strip('"') == b.strip('"')


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of at most ``size`` (the last may be shorter; none empty)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def as_budget(upload_buffer: int | PartBudget) -> PartBudget:
    return upload_buffer if isinstance(upload_buffer, PartBudget) else PartBudget(upload_buffer)


class PartUploads(Generic[T]):
    """The part uploads of one multipart write, up to ``in_flight`` at a time.

    The writer's thread stays the only consumer of the stream: it cuts part ``n``, hands it
    to ``send`` and goes on cutting part ``n + 1`` while up to ``in_flight`` earlier parts
    upload in threads of this object's own small pool. ``send`` waits while ``in_flight``
    parts are running; a part the ``budget`` cannot hold is uploaded in the writer's thread
    instead. ``upload(number, body)`` does one part (with its own retries) and returns
    what the commit needs (S3: the ETag). The first failure is raised by the next
    ``send`` or by ``finish``; the caller then calls ``drain`` before aborting."""

    def __init__(
        self, upload: Callable[[int, bytes], T], *, in_flight: int, budget: PartBudget, thread_name: str = "akms-part"
    ) -> None:
        self._upload = upload
        self._in_flight = check_parts_in_flight(in_flight)
        self._budget = budget
        self._thread_name = thread_name
        self._pool: ThreadPoolExecutor | None = None
        self._running: dict[Future[T], int] = {}
        self._results: dict[int, T] = {}

    def send(self, number: int, body: bytes) -> None:
        """Upload part ``number`` (1-based), in the background if the budget allows."""
        self._collect(block=False)
        while len(self._running) >= self._in_flight:
            self._collect(block=True)
        size = len(body)
        if not self._budget.try_take(size):
            self._results[number] = self._upload(number, body)  # in this thread: no extra part held
            return
        try:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._in_flight, thread_name_prefix=self._thread_name)
            future = self._pool.submit(self._run, number, body, size)
        except BaseException:
            self._budget.give_back(size)
            raise
        self._running[future] = number

    def send_all(self, parts: Iterable[bytes], *, limit: int, where: str, unit: str = "parts") -> int:
        """``send`` each of ``parts`` as parts 1, 2, …; ``ValidationError`` naming ``where``
        past ``limit`` parts. Returns the bytes sent. Holds no reference to a part once
        sent (the bound on memory counts on it)."""
        size = 0
        number = 0
        for body in parts:  # not enumerate(): its cached tuple would keep the last part alive
            number += 1  # noqa: SIM113
            if number > limit:
                raise ValidationError(f"{where}: object exceeds {limit} {unit}")
            size += len(body)
            self.send(number, body)
            del body
        return size

    def _run(self, number: int, body: bytes, size: int) -> T:
        try:
            return self._upload(number, body)
        finally:
            self._budget.give_back(size)

    def _collect(self, *, block: bool) -> None:
        """Record finished parts; raises the error of a failed one."""
        if not self._running:
            return
        if block:
            finished = wait(self._running, return_when=FIRST_COMPLETED).done
        else:
            finished = {f for f in self._running if f.done()}
        for future in finished:
            number = self._running.pop(future)
            self._results[number] = future.result()

    def finish(self) -> list[tuple[int, T]]:
        """Wait for every part; ``(number, result)`` in part order. Raises the first failure."""
        while self._running:
            self._collect(block=True)
        self._close()
        return sorted(self._results.items())

    def drain(self) -> None:
        """After a failure: wait for the parts already sent (a request cannot be recalled
        half way), ignoring their outcome, so that an abort that follows is the last word
        and no thread writes for this object after the call returns."""
        if self._running:
            wait(self._running)
            self._running.clear()
        self._close()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def handover(head: list[bytes], rest: Iterator[tuple[bytes, bool]]) -> Iterator[bytes]:
    """Yield the part peeked into ``head`` (popping it, so no reference stays behind and
    memory stays at about one part), then the rest of ``iter_parts``."""
    while head:
        yield head.pop()
    for part, _ in rest:
        yield part
        del part  # a generator frame would otherwise keep the previous part alive


class ObjectReader(io.BufferedIOBase):
    """A read-only binary stream over chunks from a backend.

    ``read(n)`` returns exactly ``n`` bytes unless at the end; iterating yields the
    backend's chunks (not lines). The total is checked against ``info.size``: a stream that
    ends early or runs long raises ``TransientError`` (the read can be retried) instead of
    returning a short body (faults A3)."""

    def __init__(
        self, info: ObjectInfo, chunks: Iterator[bytes], *, label: str, on_close: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self.info = info
        self._chunks = chunks
        self._label = label
        self._on_close = on_close
        # The current chunk and how much of it was handed out: consuming it moves the
        # offset instead of copying the rest (a 1-byte read must not copy a 1 MiB chunk).
        self._buf = b""
        self._off = 0
        self._pos = 0  # bytes handed out or buffered so far, from the backend
        self._eof = False

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bytes:
        if self._eof:
            return b""
        for chunk in self._chunks:
            if not chunk:
                continue
            self._pos += len(chunk)
            if self._pos > self.info.size:
                raise TransientError(
                    f"{self._label}: read more bytes than the object's size {self.info.size} (object changed?)",
                    resource=self._label,
                )
            return bytes(chunk)
        self._eof = True
        if self._pos != self.info.size:
            raise TransientError(
                f"{self._label}: stream ended after {self._pos} of {self.info.size} bytes (truncated read)",
                resource=self._label,
            )
        return b""

    def _take(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current chunk (the chunk itself if it is all of it)."""
        out = self._buf[self._off : self._off + n]  # a whole bytes slice is the object itself: no copy
        self._off += len(out)
        if self._off >= len(self._buf):
            self._buf, self._off = b"", 0
        return out

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed ObjectReader")
        want = -1 if size is None or size < 0 else size
        parts: list[bytes] = []
        got = 0
        while want < 0 or got < want:
            if not self._buf:
                self._buf = self._next_chunk()
                if not self._buf:
                    break
            part = self._take(len(self._buf) if want < 0 else want - got)
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read1(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed ObjectReader")
        if not self._buf:
            self._buf = self._next_chunk()
        return self._take(len(self._buf) if size is None or size < 0 else size)

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def __iter__(self) -> Iterator[bytes]:  # type: ignore[override]
        return self

    def __next__(self) -> bytes:  # type: ignore[override]
        chunk = self.read1()
        if not chunk:
            raise StopIteration
        return chunk

    def close(self) -> None:
        if not self.closed:
            try:
                if self._on_close is not None:
                    self._on_close()
            finally:
                super().close()

    def __repr__(self) -> str:
        return f"ObjectReader({self._label}, {self.info.size} bytes)"
