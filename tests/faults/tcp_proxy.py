"""Fault-injecting TCP proxies for services that are not plain HTTP (fault tier, issue 17).

``TcpProxy`` forwards bytes between a client and a service and can, on command or by a
seeded rule, break the connections in the ways networks and servers do:

* ``reset_all()``: every open connection is reset (RST on both sides);
* ``outage(seconds)``: the port refuses connections for a while (a restarting server);
* ``blackhole(True)``: connections stay open but nothing is forwarded (a hung server:
  the client's timeout fires); switching it off resets the connections that hung;
* rules ``(Chunk) -> "reset" | None`` seen for every chunk a client sends, so a reset
  can land in the middle of a request (``RandomChunkReset``, seeded, for KMIP, whose
  TTLV messages travel inside TLS and cannot be read here).

``PgProxy`` speaks enough of the PostgreSQL wire protocol (v3) to act per statement:
it frames the client's messages into groups (a simple ``Query``, or extended-protocol
messages up to ``Sync``), knows the SQL of each (``Parse`` text, or the prepared
statement a ``Bind`` names) and applies rules ``(Statement) -> PgFault | None``:

* ``PgError(sqlstate, message)``: the group never reaches the server; the client gets
  an ``ErrorResponse`` with that SQLSTATE and ``ReadyForQuery`` in the failed-transaction
  state, exactly what a real serialization failure (40001) or deadlock (40P01) looks
  like to a driver; the server's transaction is rolled back by the ``ROLLBACK`` the
  driver sends next;
* ``PgDrop(after_forward=False)``: the connection is reset before the statement is
  forwarded (it never ran) or, with ``after_forward``, once the server answered (it ran,
  and committed if it was a ``COMMIT``: the ambiguous commit).

Everything is counted in ``injected`` (the fault tier's report reads it).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar


def _reset(sock: socket.socket) -> None:
    """Reset (RST) a connection that another thread may be blocked reading: SHUT_RD wakes
    that reader (a bare close would leave it blocked and the kernel socket alive), then a
    close with SO_LINGER 0 sends the RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _close_listener(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@dataclass
class Chunk:
    conn: int  # 1-based connection number
    index: int  # 1-based chunk number within the connection (client -> service)
    size: int


ChunkRule = Callable[[Chunk], "str | None"]


@dataclass
class RandomChunkReset:
    """Each client chunk resets its connection with probability ``rate`` (seeded), at
    most ``limit`` times in all."""

    rate: float
    seed: int
    limit: int = 1_000_000
    hits: int = 0
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, chunk: Chunk) -> str | None:
        if self.hits < self.limit and self._rng.random() < self.rate:
            self.hits += 1
            return "reset"
        return None


@dataclass
class NthChunkReset:
    """The ``n``-th client chunk of any connection (1-based, counted across connections)
    resets its connection, ``times`` times in a row from there."""

    n: int
    times: int = 1
    seen: int = 0

    def __call__(self, chunk: Chunk) -> str | None:
        self.seen += 1
        return "reset" if self.n <= self.seen < self.n + self.times else None


class TcpProxy:
    """``TcpProxy((host, port))``: ``port``, ``reset_all()``, ``outage(s)``, ``blackhole(on)``,
    ``rules``, ``injected``, ``close()``."""

    instances: ClassVar[list[TcpProxy]] = []

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.rules: list[ChunkRule] = []
        self.injected: Counter[str] = Counter()
        self.connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._hung: set[socket.socket] = set()
        self._blackhole = False
        self._stall_until = 0.0
        self._closed = False
        self._listener: socket.socket | None = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._start_accepting(self._listener)
        TcpProxy.instances.append(self)

    # --- control ---------------------------------------------------------------------

    def set_rules(self, *rules: ChunkRule) -> None:
        with self._lock:
            self.rules = list(rules)

    def reset_all(self, *, count: bool = True) -> int:
        with self._lock:
            socks = list(self._open)
            self._open.clear()
            if socks and count:
                self.injected["reset-all"] += 1
        for s in socks:
            _reset(s)
        return len(socks) // 2

    def stall(self, seconds: float) -> None:
        """Forward nothing for ``seconds`` (a slow server), then carry on: nothing is reset."""
        with self._lock:
            self._stall_until = time.monotonic() + seconds
            self.injected[f"stall({seconds:g}s)"] += 1

    def outage(self, seconds: float, *, wait: bool = False) -> None:
        """Reset every connection and refuse new ones for ``seconds``."""
        with self._lock:
            listener, self._listener = self._listener, None
            self.injected["outage"] += 1
        if listener is not None:
            _close_listener(listener)
        self.reset_all()

        def back() -> None:
            time.sleep(seconds)
            with self._lock:
                if self._closed or self._listener is not None:
                    return
                self._listener = socket.create_server((self.host, self.port))
                self._start_accepting(self._listener)

        if wait:
            back()
        else:
            threading.Thread(target=back, daemon=True).start()

    def blackhole(self, on: bool) -> None:
        """While on, nothing is forwarded either way (connections stay open); off again,
        the connections that hung are reset."""
        with self._lock:
            self._blackhole = on
            if on:
                self.injected["blackhole"] += 1
                return
            hung, self._hung = list(self._hung), set()
        for s in hung:
            _reset(s)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            listener, self._listener = self._listener, None
        if listener is not None:
            _close_listener(listener)
        self.reset_all(count=False)

    # --- plumbing --------------------------------------------------------------------

    def _start_accepting(self, listener: socket.socket) -> None:
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self.connections += 1
                n = self.connections
                self._open.update((client, upstream))
            self._serve(n, client, upstream)

    def _serve(self, n: int, client: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._pump, args=(n, client, upstream, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(n, upstream, client, False), daemon=True).start()

    def _hold(self, *socks: socket.socket) -> bool:
        """Block while blackholed; False if the connection was reset meanwhile."""
        while True:
            with self._lock:
                if not self._blackhole and time.monotonic() >= self._stall_until:
                    return all(s in self._open for s in socks)
                if self._blackhole:
                    self._hung.update(socks)
            time.sleep(0.02)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._open.discard(s)
        for s in socks:
            _reset(s)

    def _pump(self, n: int, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        chunks = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                if not self._hold(src, dst):
                    return
                if from_client:
                    chunks += 1
                    with self._lock:
                        actions = [rule(Chunk(n, chunks, len(data))) for rule in self.rules]
                    if "reset" in actions:
                        with self._lock:
                            self.injected["chunk-reset"] += 1
                        self._drop(src, dst)
                        return
                dst.sendall(data)
        except OSError:
            self._drop(src, dst)


# --- PostgreSQL -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgError:
    """Answer the statement with this SQLSTATE instead of forwarding it."""

    sqlstate: str = "40001"
    message: str = "could not serialize access due to concurrent update (injected)"


@dataclass(frozen=True)
class PgDrop:
    """Reset the connection before forwarding the statement, or (``after_forward``)
    once the server has answered it."""

    after_forward: bool = False


PgFault = PgError | PgDrop


@dataclass
class Statement:
    conn: int
    sql: str  # the group's first statement text ("" if none, e.g. a bare Sync)
    tx_status: str  # the last ReadyForQuery status seen: I (idle), T (in a transaction), E (failed)


PgRule = Callable[[Statement], "PgFault | None"]


@dataclass
class SqlNth:
    """The ``n``-th statement whose SQL contains ``needle`` (case-insensitive), and the
    ``times - 1`` after it, get ``fault``; ``in_tx`` restricts to statements inside a
    transaction."""

    needle: str
    fault: PgFault
    n: int = 1
    times: int = 1
    in_tx: bool = False
    seen: int = 0

    def __call__(self, st: Statement) -> PgFault | None:
        if self.needle.lower() not in st.sql.lower() or (self.in_tx and st.tx_status != "T"):
            return None
        self.seen += 1
        return self.fault if self.n <= self.seen < self.n + self.times else None


@dataclass
class SqlRandom:
    """Each statement containing ``needle`` (inside a transaction) gets ``fault`` with
    probability ``rate`` (seeded), at most ``limit`` times."""

    needle: str
    fault: PgFault
    rate: float
    seed: int
    limit: int = 1_000_000
    hits: int = 0
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, st: Statement) -> PgFault | None:
        if self.needle.lower() not in st.sql.lower() or st.tx_status != "T" or self.hits >= self.limit:
            return None
        if self._rng.random() < self.rate:
            self.hits += 1
            return self.fault
        return None


_SPECIAL_REQUESTS = (80877103, 80877104, 80877102)  # SSLRequest, GSSENCRequest, CancelRequest


class _Buffered:
    """Reads from a socket in large chunks and hands out whole protocol messages (one
    recv per burst, not two per message: the proxy must not slow every statement)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(256 * 1024)
        if not data:
            raise ConnectionError("peer closed")
        self.buf += data

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def typed(self) -> tuple[bytes, bytes]:
        while len(self.buf) < 5:
            self._fill()
        length = struct.unpack("!I", self.buf[1:5])[0]
        msg = self.exact(1 + length)
        return msg[:1], msg

    def more(self) -> bool:
        """Whether a whole message is already buffered."""
        return len(self.buf) >= 5 and len(self.buf) >= 1 + struct.unpack("!I", self.buf[1:5])[0]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise ConnectionError("peer closed")
        out += data
    return out


def _cstr(payload: bytes, at: int = 0) -> tuple[str, int]:
    end = payload.index(b"\0", at)
    return payload[at:end].decode("utf-8", "replace"), end + 1


def error_response(sqlstate: str, message: str) -> bytes:
    fields = b"".join(k + v.encode() + b"\0" for k, v in ((b"S", "ERROR"), (b"V", "ERROR"), (b"C", sqlstate)))
    fields += b"M" + message.encode() + b"\0" + b"\0"
    return b"E" + struct.pack("!I", len(fields) + 4) + fields


def ready_for_query(status: str) -> bytes:
    return b"Z" + struct.pack("!I", 5) + status.encode()


class _PgConn:
    """State shared by the two pumps of one proxied PostgreSQL connection."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.statements: dict[str, str] = {}  # prepared statement name -> SQL
        self.tx_status = "I"
        self.pending = 0  # groups forwarded and not yet answered (ReadyForQuery)
        self.drop_on_answer = 0  # groups whose answer is replaced by a reset
        self.cond = threading.Condition()


class PgProxy(TcpProxy):
    """A TcpProxy in front of PostgreSQL that can fail single statements (see module doc)."""

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.pg_rules: list[PgRule] = []
        self.statements_seen = 0
        super().__init__(upstream, host=host)

    def set_pg_rules(self, *rules: PgRule) -> None:
        with self._lock:
            self.pg_rules = list(rules)

    def _serve(self, n: int, client: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._client_side, args=(_PgConn(n), client, upstream), daemon=True).start()

    def _client_side(self, conn: _PgConn, client: socket.socket, upstream: socket.socket) -> None:
        try:
            # Startup: untyped messages until the StartupMessage; SSL/GSS requests get the
            # server's one-byte answer (this proxy cannot carry TLS: 'N' is expected).
            while True:
                length = struct.unpack("!I", _recv_exact(client, 4))[0]
                body = _recv_exact(client, length - 4)
                code = struct.unpack("!I", body[:4])[0]
                upstream.sendall(struct.pack("!I", length) + body)
                if code in (80877103, 80877104):
                    answer = _recv_exact(upstream, 1)
                    client.sendall(answer)
                    if answer != b"N":
                        raise ConnectionError("the proxy cannot carry TLS to PostgreSQL")
                    continue
                if code == 80877102:  # a cancel request: one-shot connection
                    threading.Thread(target=self._raw_pump, args=(upstream, client), daemon=True).start()
                    self._raw_pump(client, upstream)
                    return
                break
            threading.Thread(target=self._server_side, args=(conn, client, upstream), daemon=True).start()
            group: list[tuple[bytes, bytes]] = []
            reader = _Buffered(client)
            while True:
                kind, msg = reader.typed()
                group.append((kind, msg))
                if kind == b"X":  # Terminate
                    upstream.sendall(b"".join(m for _, m in group))
                    return
                if kind not in (b"S", b"Q"):
                    continue
                self._send_group(conn, client, upstream, group)
                group = []
        except (OSError, ConnectionError, ValueError, struct.error):
            self._drop(client, upstream)

    def _group_sql(self, conn: _PgConn, group: list[tuple[bytes, bytes]]) -> str:
        sql = ""
        for kind, msg in group:
            payload = msg[5:]
            if kind == b"Q":
                return _cstr(payload)[0]
            if kind == b"P":
                name, at = _cstr(payload)
                text, _ = _cstr(payload, at)
                conn.statements[name] = text
                sql = sql or text
            elif kind == b"B":
                _portal, at = _cstr(payload)
                name, _ = _cstr(payload, at)
                sql = sql or conn.statements.get(name, "")
        return sql

    def _send_group(
        self, conn: _PgConn, client: socket.socket, upstream: socket.socket, group: list[tuple[bytes, bytes]]
    ) -> None:
        sql = self._group_sql(conn, group)
        with conn.cond:
            tx = conn.tx_status
        with self._lock:
            self.statements_seen += 1
            decisions = [rule(Statement(conn.n, sql, tx)) for rule in self.pg_rules]
            fault = next((d for d in decisions if d is not None), None)
            if fault is not None:
                self.injected[
                    f"pg {type(fault).__name__}{'(' + fault.sqlstate + ')' if isinstance(fault, PgError) else ''}"
                ] += 1
        if not self._hold(client, upstream):
            raise ConnectionError("reset while blackholed")
        if isinstance(fault, PgDrop) and not fault.after_forward:
            raise ConnectionError("injected: connection dropped before the statement")
        if fault is not None:
            with conn.cond:
                while conn.pending:  # answers to earlier groups go out first
                    conn.cond.wait(0.1)
        if isinstance(fault, PgError):
            with conn.cond:
                status = "E" if conn.tx_status in ("T", "E") else "I"
                conn.tx_status = status
            client.sendall(error_response(fault.sqlstate, fault.message) + ready_for_query(status))
            return
        with conn.cond:
            conn.pending += 1
            if isinstance(fault, PgDrop):
                conn.drop_on_answer += 1
        upstream.sendall(b"".join(m for _, m in group))

    def _server_side(self, conn: _PgConn, client: socket.socket, upstream: socket.socket) -> None:
        reader = _Buffered(upstream)
        out: list[bytes] = []
        try:
            while True:
                kind, msg = reader.typed()
                if kind == b"Z":
                    with conn.cond:
                        conn.tx_status = msg[5:6].decode()
                        conn.pending = max(0, conn.pending - 1)
                        drop = conn.drop_on_answer > 0
                        conn.cond.notify_all()
                    if drop:
                        raise ConnectionError("injected: connection dropped after the statement ran")
                out.append(msg)
                if kind == b"Z" or not reader.more():  # forward a burst in one write
                    client.sendall(b"".join(out))
                    out.clear()
        except (OSError, ConnectionError, ValueError, struct.error):
            self._drop(client, upstream)

    def _raw_pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._drop(src, dst)
