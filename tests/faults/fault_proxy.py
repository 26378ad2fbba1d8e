"""A fault-injecting HTTP/1.1 proxy for the storage fault tier (faults.md section A).

It sits on loopback in front of a real service (LocalStack, Azurite), forwards requests
byte for byte (signatures stay valid: neither SigV4 nor SharedKey signs the port in a way
the services check), and lets a test decide, request by request, to answer instead of
the service, cut the connection, drop a committed response, or rewrite a response.

Rules are plain callables ``(Request) -> Fault | None``. Every rule sees every request
(so ``Nth(n=2)`` means the second matching request, whatever other rules did to the
first), and the first fault returned wins. Decisions are taken under one lock, so seeded
rules (``RandomRate``) are repeatable for a sequential workload. ``Proxy.log`` records
every request and what was done to it since the last ``set_rules``: that log is the
retry counter the tests assert on.

Only what the SDKs send is supported: Content-Length request bodies (chunked ones are
passed through), ``Expect: 100-continue`` (answered here), keep-alive connections.

HTTPS services (the Key Vault emulator) are proxied by terminating TLS here
(``TlsTermination``): the client trusts a certificate the test made (``make_tls_cert``),
and the proxy speaks TLS to the service, trusting the service's own certificate.

``outage(seconds)`` takes the proxy off the network for a while: every open connection is
reset and the port refuses new ones, then it listens again on the same port (what a
client sees of a node restart). ``injected`` counts every fault given since the proxy was
made (never reset by ``set_rules``); the fault tier's report reads it.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import random
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

_HEAD_LIMIT = 64 * 1024


# --- messages ---------------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes
    op: str = ""  # filled by the proxy's classifier (``s3_op`` / ``azure_op``)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def serialize(self, *, has_body: bool = True) -> bytes:
        """Status line and headers, re-framed with Content-Length (responses are not signed)."""
        lines = [f"HTTP/1.1 {self.status} {self.reason}"]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in ("content-length", "transfer-encoding")]
        if has_body:
            lines.append(f"Content-Length: {len(self.body)}")
        else:
            length = next((v for k, v in self.headers if k.lower() == "content-length"), None)
            if length is not None:
                lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- faults -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Answer instead of the service; the request never reaches it."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = "Injected"


@dataclass(frozen=True)
class ResetMidRequest:
    """Forward the head and the first ``after`` body bytes, then reset both connections
    (the service sees a truncated upload; the client sees a reset while sending)."""

    after: int


@dataclass(frozen=True)
class DropResponse:
    """Forward the whole request, let the service commit, then reset the client's
    connection instead of answering (a response lost after the commit, faults A7)."""


@dataclass(frozen=True)
class CutResponse:
    """Forward, then send the status, headers and the first ``after`` body bytes, then end
    the connection: by default with a FIN once the client has read them (exactly ``after``
    bytes arrive, then EOF short of Content-Length); ``rst=True`` resets instead (the
    client's kernel may drop bytes it had received but not yet read)."""

    after: int
    rst: bool = False


@dataclass(frozen=True)
class Rewrite:
    """Forward, then replace the service's response with ``change(request, response)``."""

    change: Callable[[Request, Response], Response]


@dataclass(frozen=True)
class CorruptBody:
    """Flip one bit of the request body at ``offset`` before forwarding (wire corruption)."""

    offset: int


@dataclass(frozen=True)
class Reset:
    """Reset the client's connection without forwarding anything (the request never
    reaches the service: a connection lost before the request was delivered)."""


@dataclass(frozen=True)
class Stall:
    """Hold the request for ``seconds`` (a slow or hung service), then apply ``then``
    (another fault, e.g. ``Reset()`` for a timeout that never reached the service), or
    forward it normally when ``then`` is None."""

    seconds: float
    then: Any = None


@dataclass(frozen=True)
class Splice:
    """Forward a changed request and change the answer to match: ``request(req) -> (body,
    memo)`` gives the body sent upstream (Content-Length is re-framed), ``response(req,
    resp, memo) -> resp`` the answer the client gets. For partial failures a service
    decides per item (bulk): the failed items never reach it, the others do."""

    request: Callable[[Request], tuple[bytes, Any]]
    response: Callable[[Request, Response, Any], Response]


@dataclass(frozen=True)
class Outage:
    """Take the whole proxy down for ``seconds`` (``Proxy.outage``), starting with this
    request, which is reset unanswered: a service that crashed while serving it."""

    seconds: float


Fault = Reply | ResetMidRequest | DropResponse | CutResponse | Rewrite | CorruptBody | Reset | Stall | Splice | Outage
Rule = Callable[[Request], "Fault | None"]


# --- rules ------------------------------------------------------------------------------------


Match = Callable[[Request], bool]


def ops(*names: str) -> Match:
    """Match requests whose classified operation is one of ``names`` (any if none given)."""
    return lambda req: not names or req.op in names


@dataclass
class Times:
    """The first ``n`` matching requests get ``fault``."""

    match: Match
    fault: Fault
    n: int = 1
    hits: int = 0

    def __call__(self, req: Request) -> Fault | None:
        if self.hits < self.n and self.match(req):
            self.hits += 1
            return self.fault
        return None


@dataclass
class Nth:
    """Only the ``n``-th (1-based) matching request gets ``fault``."""

    match: Match
    fault: Fault
    n: int
    seen: int = 0

    def __call__(self, req: Request) -> Fault | None:
        if self.match(req):
            self.seen += 1
            if self.seen == self.n:
                return self.fault
        return None


@dataclass
class From:
    """Every matching request from the ``n``-th (1-based) on gets ``fault``."""

    match: Match
    fault: Fault
    n: int = 1
    seen: int = 0

    def __call__(self, req: Request) -> Fault | None:
        if self.match(req):
            self.seen += 1
            if self.seen >= self.n:
                return self.fault
        return None


@dataclass
class RandomRate:
    """Each matching request gets ``fault`` with probability ``rate``, from a seeded RNG."""

    match: Match
    fault: Fault
    rate: float
    seed: int
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, req: Request) -> Fault | None:
        if self.match(req) and self._rng.random() < self.rate:
            return self.fault
        return None


@dataclass
class Burst:
    """Every matching request gets ``fault`` for ``seconds`` after the first matching one."""

    match: Match
    fault: Fault
    seconds: float
    started: float | None = None

    def __call__(self, req: Request) -> Fault | None:
        if not self.match(req):
            return None
        now = time.monotonic()
        if self.started is None:
            self.started = now
        return self.fault if now - self.started < self.seconds else None


@dataclass
class Always:
    match: Match
    fault: Fault

    def __call__(self, req: Request) -> Fault | None:
        return self.fault if self.match(req) else None


# --- operation names ----------------------------------------------------------------------------


def s3_op(req: Request) -> str:
    q = req.query
    if req.method == "HEAD":
        return "HeadObject"
    if req.method == "PUT":
        return "UploadPart" if "partNumber" in q else "PutObject"
    if req.method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        return "CompleteMultipartUpload" if "uploadId" in q else "POST"
    if req.method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    if req.method == "GET":
        if "list-type" in q:
            return "ListObjectsV2"
        if "uploads" in q:
            return "ListMultipartUploads"
        return "GetObject"
    return req.method


def azure_op(req: Request) -> str:
    comp = (req.query.get("comp") or [""])[0]
    if req.method == "HEAD":
        return "GetBlobProperties"
    if req.method == "PUT":
        return {"block": "PutBlock", "blocklist": "PutBlockList", "": "PutBlob"}.get(comp, "PUT " + comp)
    if req.method == "GET":
        if comp == "list":
            return "ListBlobs"
        return "GetBlockList" if comp == "blocklist" else "GetBlob"
    if req.method == "DELETE":
        return "DeleteBlob"
    return req.method


def aws_op(req: Request) -> str:
    """KMS operations by their ``X-Amz-Target`` (``kms:Encrypt``), S3 ones as ``s3_op``:
    LocalStack serves both on one endpoint, so one proxy sees both."""
    target = req.header("X-Amz-Target") or ""
    if target.startswith("TrentService."):
        return "kms:" + target.split(".", 1)[1]
    return s3_op(req)


KMS_CRYPTO_OPS = ("kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:ReEncrypt")


def keyvault_op(req: Request) -> str:
    """Key Vault REST operations: ``wrapKey``, ``unwrapKey``, ``getKey``, ..."""
    parts = [p for p in req.path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "keys":
        last = parts[-1].lower()
        if req.method == "POST" and last in ("wrapkey", "unwrapkey", "encrypt", "decrypt", "sign", "verify"):
            return {"wrapkey": "wrapKey", "unwrapkey": "unwrapKey"}.get(last, last)
        if req.method == "GET":
            return "getKey"
    return f"{req.method} {'/'.join(parts[:1])}"


def es_op(req: Request) -> str:
    """Elasticsearch APIs by their path: ``bulk``, ``aliases``, ``search``, ``count``, ..."""
    parts = [p for p in req.path.split("/") if p]
    for name in ("_bulk", "_aliases", "_search", "_count", "_refresh", "_mapping", "_block", "_settings", "_alias"):
        if name in parts:
            return name.lstrip("_")
    return f"{req.method} index" if parts else f"{req.method} /"


# --- TLS termination -------------------------------------------------------------------------------


def make_tls_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and key) for ``localhost`` / ``127.0.0.1``, for a proxy
    that terminates TLS; the test trusts it as the CA bundle."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fault-proxy")])
    now = _dt.datetime.now(_dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "proxy-cert.pem", directory / "proxy-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@dataclass(frozen=True)
class TlsTermination:
    """TLS toward the client with ``cert``/``key``; toward the service trusting ``upstream_ca``."""

    cert: Path
    key: Path
    upstream_ca: str
    upstream_hostname: str = "localhost"

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def upstream_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.upstream_ca)


# --- the proxy ----------------------------------------------------------------------------------


@dataclass
class LogEntry:
    op: str
    method: str
    target: str
    fault: str | None
    request_headers: list[tuple[str, str]]
    request_body: bytes | None = None  # kept only by a Proxy(keep_bodies=True)
    at: float = field(default_factory=time.monotonic)


class _Reset(Exception):
    """End this client connection (after a fault or a broken peer)."""


class _Close(Exception):
    """End this client connection with a FIN after the client read what was sent."""


def _close_gracefully(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        while sock.recv(65536):  # until the client closes its side
            pass
    except OSError:
        pass
    sock.close()


def _reset(sock: socket.socket | None) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox would. SHUT_RD first:
    it sends nothing, but wakes a thread of ours blocked reading the socket (a bare close
    would leave it blocked, and the connection alive in the kernel)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        socket.socket.shutdown(sock, socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _close_listener(sock: socket.socket) -> None:
    """Stop listening now: shutdown wakes the thread blocked in accept (close alone does
    not, and the kernel would keep accepting connections into the backlog)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _Reader:
    """Buffered reads from a socket, for HTTP framing."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    def _fill(self) -> bool:
        data = self._sock.recv(256 * 1024)
        if not data:
            return False
        self._buf += data
        return True

    def head(self) -> bytes | None:
        while b"\r\n\r\n" not in self._buf:
            if len(self._buf) > _HEAD_LIMIT:
                raise _Reset("header too long")
            if not self._fill():
                if self._buf:
                    raise _Reset("peer closed mid-head")
                return None
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n"

    def exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise _Reset("peer closed mid-body")
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def line(self) -> bytes:
        while b"\r\n" not in self._buf:
            if not self._fill():
                raise _Reset("peer closed mid-chunk")
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def until_close(self) -> bytes:
        while self._fill():
            pass
        out, self._buf = self._buf, b""
        return out


def _fault_name(fault: Any) -> str:
    name = type(fault).__name__
    if isinstance(fault, Reply):
        return f"{name}({fault.status})"
    if isinstance(fault, Stall):
        return f"Stall({fault.seconds:g}s)" + (f"+{_fault_name(fault.then)}" if fault.then is not None else "")
    return name


def _with_content_length(head: bytes, length: int) -> bytes:
    start, headers = _parse_head(head)
    headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
    headers.append(("Content-Length", str(length)))
    return (start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
    return lines[0], headers


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _read_chunked(reader: _Reader) -> tuple[bytes, bytes]:
    """(decoded body, raw bytes as received)."""
    decoded, raw = [], []
    while True:
        line = reader.line()
        raw.append(line + b"\r\n")
        size = int(line.split(b";", 1)[0], 16)
        if size == 0:
            while True:  # trailers until an empty line
                t = reader.line()
                raw.append(t + b"\r\n")
                if not t:
                    return b"".join(decoded), b"".join(raw)
        data = reader.exactly(size + 2)
        raw.append(data)
        decoded.append(data[:-2])


class Proxy:
    """``Proxy(upstream_port, classify=s3_op)``; ``url``; ``rules``; ``log``; ``close()``.
    ``keep_bodies=True`` keeps every request body in the log (small requests only: an
    Elasticsearch client's, to prove what went over the wire)."""

    #: Every proxy made in this process (the fault tier's report sums their ``injected``).
    instances: ClassVar[list[Proxy]] = []

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        classify: Callable[[Request], str],
        tls: TlsTermination | None = None,
        host: str = "127.0.0.1",
        keep_bodies: bool = False,
    ) -> None:
        self.upstream = upstream
        self.classify = classify
        self.keep_bodies = keep_bodies  # log each request's body too (what went over the wire)
        self.rules: list[Rule] = []
        self.log: list[LogEntry] = []
        self.injected: Counter[str] = Counter()  # "op fault" -> count, since the proxy was made
        self._lock = threading.Lock()
        self._tls = tls
        self._server_ctx = tls.server_context() if tls else None
        self._upstream_ctx = tls.upstream_context() if tls else None
        self.host = host
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._closed = False
        self._down_until = 0.0
        self._start_accepting(self._listener)
        Proxy.instances.append(self)

    @property
    def url(self) -> str:
        scheme = "https" if self._tls else "http"
        host = "localhost" if self._tls else self.host
        return f"{scheme}://{host}:{self.port}"

    def outage(self, seconds: float) -> None:
        """Reset every open connection and refuse new ones for ``seconds``, then listen
        again on the same port (returns at once)."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            listener, self._listener = self._listener, None
            self.injected["* outage"] += 1
            for s in list(self._open):
                _reset(s)
            self._open.clear()
        if listener is not None:
            _close_listener(listener)

        def back() -> None:
            time.sleep(seconds)
            with self._lock:
                if self._closed or self._listener is not None:
                    return
                self._listener = socket.create_server((self.host, self.port))
                self._start_accepting(self._listener)

        threading.Thread(target=back, daemon=True, name=f"fault-proxy-{self.port}-back").start()

    def wait_until_up(self, timeout: float = 60.0) -> None:
        """Return once an outage is over and the proxy listens again (at once if none)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._listener is not None or self._closed:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy on port {self.port} did not come back within {timeout:g} s")
            time.sleep(0.05)

    def _start_accepting(self, listener: socket.socket) -> None:
        threading.Thread(target=self._accept, args=(listener,), name=f"fault-proxy-{self.port}", daemon=True).start()

    def set_rules(self, *rules: Rule) -> None:
        """Replace the rules and start a new log."""
        with self._lock:
            self.rules = list(rules)
            self.log = []

    def faults(self, op: str | None = None) -> list[LogEntry]:
        """Requests that got a fault (of operation ``op``)."""
        with self._lock:
            return [e for e in self.log if e.fault and (op is None or e.op == op)]

    def requests(self, op: str | None = None) -> list[LogEntry]:
        with self._lock:
            return [e for e in self.log if op is None or e.op == op]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            listener, self._listener = self._listener, None
            for s in list(self._open):
                _reset(s)
        if listener is not None:
            _close_listener(listener)

    # --- internals ---

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _decide(self, req: Request) -> Fault | None:
        with self._lock:
            faults = [rule(req) for rule in self.rules]  # every rule counts every request
            fault = next((f for f in faults if f is not None), None)
            self.log.append(
                LogEntry(
                    req.op,
                    req.method,
                    req.target,
                    _fault_name(fault) if fault else None,
                    list(req.headers),
                    req.body if self.keep_bodies else None,
                )
            )
            if fault is not None:
                self.injected[f"{req.op} {_fault_name(fault)}"] += 1
            return fault

    def _connect_upstream(self) -> socket.socket:
        sock = socket.create_connection(self.upstream, timeout=60)
        if self._upstream_ctx is not None:
            sock = self._upstream_ctx.wrap_socket(sock, server_hostname=self._tls.upstream_hostname)
        return sock

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        if self._server_ctx is not None:
            try:
                client.settimeout(30)
                tls_client = self._server_ctx.wrap_socket(client, server_side=True)
                tls_client.settimeout(None)
            except (OSError, ssl.SSLError):
                _reset(client)
                with self._lock:
                    self._open.discard(client)
                return
            with self._lock:
                self._open.discard(client)
                self._open.add(tls_client)
            client = tls_client
        reader = _Reader(client)
        try:
            while True:
                req = self._read_request(client, reader)
                if req is None:
                    return
                fault = self._decide(req)
                while isinstance(fault, Stall):
                    time.sleep(fault.seconds)
                    fault = fault.then
                if isinstance(fault, Reset):
                    raise _Reset("injected reset before forwarding")
                if isinstance(fault, Outage):
                    self.outage(fault.seconds)
                    raise _Reset("injected outage")
                if isinstance(fault, Reply):
                    resp = Response(fault.status, fault.reason, list(fault.headers), fault.body)
                    client.sendall(
                        resp.serialize(has_body=req.method != "HEAD") + (resp.body if req.method != "HEAD" else b"")
                    )
                    continue
                if upstream is None:
                    upstream = self._connect_upstream()
                    with self._lock:
                        self._open.add(upstream)
                    up_reader = _Reader(upstream)
                if isinstance(fault, ResetMidRequest):
                    upstream.sendall(req.raw_head + req.body[: fault.after])
                    raise _Reset("injected reset mid-request")
                body, head, memo = req.body, req.raw_head, None
                if isinstance(fault, CorruptBody) and body:
                    i = fault.offset % len(body)
                    body = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
                if isinstance(fault, Splice):
                    body, memo = fault.request(req)
                    head = _with_content_length(head, len(body))
                upstream.sendall(head + body)
                resp, close_after = self._read_response(up_reader, req.method)
                if isinstance(fault, DropResponse):
                    raise _Reset("injected: response dropped after commit")
                has_body = req.method != "HEAD" and resp.status not in (204, 304)
                if isinstance(fault, CutResponse):
                    client.sendall(resp.serialize(has_body=has_body) + resp.body[: fault.after])
                    if fault.rst:
                        raise _Reset("injected reset mid-response")
                    raise _Close()
                if isinstance(fault, Rewrite):
                    resp = fault.change(req, resp)
                if isinstance(fault, Splice):
                    resp = fault.response(req, resp, memo)
                client.sendall(resp.serialize(has_body=has_body) + (resp.body if has_body else b""))
                if close_after:
                    return
        except _Close:
            _close_gracefully(client)
        except (_Reset, OSError):
            pass
        finally:
            _reset(client)  # a no-op after a graceful close
            _reset(upstream)
            with self._lock:
                self._open.discard(client)
                self._open.discard(upstream)

    def _read_request(self, client: socket.socket, reader: _Reader) -> Request | None:
        head = reader.head()
        if head is None:
            return None
        start, headers = _parse_head(head)
        method, target, _ = start.split(" ", 2)
        if (_get(headers, "expect") or "").lower() == "100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            # Not signed by SigV4 or SharedKey; the service must not send a second 100.
            headers = [(k, v) for k, v in headers if k.lower() != "expect"]
            head = (start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")
        if (_get(headers, "transfer-encoding") or "").lower() == "chunked":
            body, raw = _read_chunked(reader)
            req = Request(method, target, headers, body, head)
            req.body = raw  # forwarded as received
        else:
            req = Request(method, target, headers, reader.exactly(int(_get(headers, "content-length") or 0)), head)
        req.op = self.classify(req)
        return req

    @staticmethod
    def _read_response(reader: _Reader, method: str) -> tuple[Response, bool]:
        while True:
            head = reader.head()
            if head is None:
                raise _Reset("upstream closed")
            start, headers = _parse_head(head)
            parts = start.split(" ", 2)
            status = int(parts[1])
            if 100 <= status < 200:
                continue
            break
        reason = parts[2] if len(parts) > 2 else ""
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif (_get(headers, "transfer-encoding") or "").lower() == "chunked":
            body, _ = _read_chunked(reader)
        elif _get(headers, "content-length") is not None:
            body = reader.exactly(int(_get(headers, "content-length") or 0))
        else:
            body = reader.until_close()
            return Response(status, reason, headers, body), True
        close = (_get(headers, "connection") or "").lower() == "close"
        return Response(status, reason, headers, body), close


# --- canned answers ------------------------------------------------------------------------------


def s3_error(status: int, code: str, message: str = "injected") -> Reply:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>INJECTED</RequestId></Error>"
    ).encode()
    return Reply(status, body, (("Content-Type", "application/xml"),))


def azure_error(status: int, code: str, retry_after: int | None = None) -> Reply:
    body = (
        f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>injected</Message></Error>'
    ).encode()
    headers = [("Content-Type", "application/xml"), ("x-ms-error-code", code)]
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    return Reply(status, body, tuple(headers))


def slow_down() -> Reply:
    return s3_error(503, "SlowDown", "Please reduce your request rate.")


def server_busy(retry_after: int | None = None) -> Reply:
    return azure_error(503, "ServerBusy", retry_after)


def kms_error(status: int, code: str, message: str = "injected") -> Reply:
    """A KMS (AWS JSON 1.1) error answer: ``ThrottlingException`` (400), ``KMSInternalException``
    (500), ``DependencyTimeoutException`` (503)..."""
    body = json.dumps({"__type": code, "message": message}).encode()
    return Reply(status, body, (("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-RequestId", "INJECTED")))


def keyvault_error(status: int, code: str, retry_after: float | None = None, message: str = "injected") -> Reply:
    """A Key Vault REST error answer, optionally with ``Retry-After`` (seconds)."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [("Content-Type", "application/json; charset=utf-8")]
    if retry_after is not None:
        headers.append(("Retry-After", f"{retry_after:g}"))
    return Reply(status, body, tuple(headers))
