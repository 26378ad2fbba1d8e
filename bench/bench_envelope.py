"""Benchmark the envelope: (a) peak memory on a large stream, (b) throughput vs raw AES-GCM.

    .venv/bin/python bench/bench_envelope.py [--size-mib 1024] [--throughput-mib 128]

(a) Encrypts, then decrypts, a ``--size-mib`` stream that is never stored: plaintext comes
    from a reader producing pseudo-random bytes lazily (AES-CTR keystream), output goes to a
    sink that only hashes it. The decrypt phase feeds ``decrypt_stream`` from a reader that
    runs ``encrypt_iter`` on the fly, so its time covers both directions and its peak RSS is
    an upper bound for decryption alone. Each phase runs in a fresh subprocess, so
    ``ru_maxrss`` is that phase's own peak. Fails (exit 1) above 150 MB.
(b) Throughput over the same in-memory data and segment size: ``encrypt_stream`` /
    ``decrypt_stream`` against raw one-shot ``AESGCM.encrypt`` / ``decrypt`` per segment,
    printed as ratios. Our API must also hash the plaintext (``plaintext_sha256`` in its
    results), so raw AES-GCM + SHA-256 over the same segments is printed as a second,
    like-for-like baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from archive_kms.crypto.envelope import (
    DEFAULT_SEGMENT_SIZE,
    ObjectBinding,
    decrypt_stream,
    encrypt_iter,
    encrypt_stream,
)
from archive_kms.crypto.secrets import SecretBytes

MIB = 1024 * 1024
RSS_LIMIT_BYTES = 150_000_000
DEK = SecretBytes(hashlib.sha256(b"bench dek").digest())
BINDING = ObjectBinding("bench-tenant", "bench-ws", b"bench/object")


class PseudoRandomReader(io.RawIOBase):
    """``size`` pseudo-random bytes (AES-CTR keystream), produced as they are read."""

    def __init__(self, size: int, seed: bytes = b"bench") -> None:
        key = hashlib.sha256(seed).digest()
        self._keystream = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
        self._left = size
        self._zeros = bytes(4 * MIB)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        out = b"".join(
            self._keystream.update(self._zeros[: min(len(self._zeros), n - done)])
            for done in range(0, n, len(self._zeros))
        )
        self._left -= len(out)
        return out


class HashingSink(io.RawIOBase):
    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return len(b)


class NullSink(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return len(b)


class IterReader(io.RawIOBase):
    """A file-like reader over an iterator of byte pieces (here: ``encrypt_iter`` output)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = b""
        self.result = None

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while len(self._buf) < n or n < 0:
            try:
                self._buf += next(self._pieces)
            except StopIteration as done:
                self.result = done.value
                break
        out, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        return out


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_phase(phase: str, size: int, segment_size: int) -> dict:
    start = time.perf_counter()
    if phase == "baseline":
        PseudoRandomReader(size).read(segment_size)
        report: dict = {}
    elif phase == "encrypt":
        sink = HashingSink()
        result = encrypt_stream(
            PseudoRandomReader(size), sink, dek=DEK, dek_id="bench-dek", binding=BINDING, segment_size=segment_size
        )
        report = {"plaintext_sha256": result.plaintext_sha256, "ciphertext_size": sink.size}
    elif phase == "decrypt":
        reader = PseudoRandomReader(size)
        source = IterReader(
            encrypt_iter(
                iter(lambda: reader.read(segment_size), b""),
                dek=DEK,
                dek_id="bench-dek",
                binding=BINDING,
                segment_size=segment_size,
            )
        )
        sink = HashingSink()
        result = decrypt_stream(source, sink, binding=BINDING, dek_for=lambda header: DEK)
        assert result.plaintext_sha256 == sink.sha.hexdigest() == source.result.plaintext_sha256
        report = {"plaintext_sha256": result.plaintext_sha256, "plaintext_size": sink.size}
    else:
        raise SystemExit(f"unknown phase {phase}")
    report.update(phase=phase, seconds=time.perf_counter() - start, peak_rss_bytes=_peak_rss_bytes())
    return report


def _in_subprocess(phase: str, size: int, segment_size: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--size-mib",
        str(size // MIB),
        "--segment-size",
        str(segment_size),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def throughput(size: int, segment_size: int, repeats: int) -> dict[str, float]:
    data = PseudoRandomReader(size, seed=b"throughput").read()
    key = os.urandom(32)
    raw = AESGCM(key)
    aad = b"\x00" * 100  # about the size of our header + binding AAD
    view = memoryview(data)
    offsets = range(0, size, segment_size)

    def nonce(i: int) -> bytes:
        return b"\x00" * 7 + i.to_bytes(4, "big") + b"\x00"

    raw_segments = [raw.encrypt(nonce(i), view[o : o + segment_size], aad) for i, o in enumerate(offsets)]
    ciphertext = io.BytesIO()
    encrypt_stream(io.BytesIO(data), ciphertext, dek=DEK, dek_id="d", binding=BINDING, segment_size=segment_size)
    envelope_bytes = ciphertext.getvalue()

    def raw_encrypt(hash_too: bool = False) -> None:
        sha = hashlib.sha256()
        for i, o in enumerate(offsets):
            if hash_too:
                sha.update(view[o : o + segment_size])
            raw.encrypt(nonce(i), view[o : o + segment_size], aad)

    def raw_decrypt(hash_too: bool = False) -> None:
        sha = hashlib.sha256()
        for i, ct in enumerate(raw_segments):
            pt = raw.decrypt(nonce(i), ct, aad)
            if hash_too:
                sha.update(pt)

    timings = {
        "raw AES-GCM encrypt": _best_seconds(raw_encrypt, repeats),
        "raw AES-GCM + SHA-256 encrypt": _best_seconds(lambda: raw_encrypt(True), repeats),
        "encrypt_stream": _best_seconds(
            lambda: encrypt_stream(
                io.BytesIO(data), NullSink(), dek=DEK, dek_id="d", binding=BINDING, segment_size=segment_size
            ),
            repeats,
        ),
        "raw AES-GCM decrypt": _best_seconds(raw_decrypt, repeats),
        "raw AES-GCM + SHA-256 decrypt": _best_seconds(lambda: raw_decrypt(True), repeats),
        "decrypt_stream": _best_seconds(
            lambda: decrypt_stream(io.BytesIO(envelope_bytes), NullSink(), binding=BINDING, dek_for=lambda h: DEK),
            repeats,
        ),
    }
    return {name: size / MIB / seconds for name, seconds in timings.items()}  # MiB/s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="stream size for the memory phases")
    parser.add_argument("--throughput-mib", type=int, default=128, help="in-memory data for the throughput phase")
    parser.add_argument("--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size_mib * MIB
    if args.phase:
        print(json.dumps(run_phase(args.phase, size, args.segment_size)))
        return 0

    print(f"(a) memory: {args.size_mib} MiB stream, segment size {args.segment_size} bytes, one subprocess per phase")
    ok = True
    phases = {p: _in_subprocess(p, size, args.segment_size) for p in ("baseline", "encrypt", "decrypt")}
    assert phases["encrypt"]["plaintext_sha256"] == phases["decrypt"]["plaintext_sha256"]
    for name, report in phases.items():
        rss = report["peak_rss_bytes"]
        within = rss < RSS_LIMIT_BYTES
        ok &= within
        rate = "" if name == "baseline" else f"  {args.size_mib / report['seconds']:8.1f} MiB/s"
        print(
            f"    {name:<8} peak RSS {rss / MIB:7.1f} MiB ({rss / 1e6:6.1f} MB)  {report['seconds']:7.2f} s{rate}"
            f"  {'ok' if within else 'OVER 150 MB'}"
        )
    print("    (decrypt phase = on-the-fly encrypt_iter feeding decrypt_stream; round trip digest matched)")

    print(
        f"(b) throughput: {args.throughput_mib} MiB in memory, segment size {args.segment_size}, best of {args.repeats}"
    )
    rates = throughput(args.throughput_mib * MIB, args.segment_size, args.repeats)
    for name, rate in rates.items():
        print(f"    {name:<32} {rate:8.1f} MiB/s")
    for direction in ("encrypt", "decrypt"):
        ours = rates[f"{direction}_stream"]
        print(
            f"    {direction}_stream / raw AES-GCM {direction}:            "
            f"{ours / rates[f'raw AES-GCM {direction}']:.2f}"
        )
        print(
            f"    {direction}_stream / raw AES-GCM + SHA-256 {direction}:  "
            f"{ours / rates[f'raw AES-GCM + SHA-256 {direction}']:.2f}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
