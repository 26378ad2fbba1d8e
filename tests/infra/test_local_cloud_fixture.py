"""The compose-or-stack fixture: engine detection, and a round trip on what it chose."""

from __future__ import annotations

import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from archive_kms import clients

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose_stack import docker_engine_answers, use_compose


def _serve_once(path: Path, status: bytes) -> Iterator[threading.Thread]:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
        srv.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("status,answers", [(b"200 OK", True), (b"500 Internal Server Error", False)])
def test_an_engine_is_what_answers_ping(tmp_path, status, answers) -> None:
    sock = tmp_path / "docker.sock"
    t = _serve_once(sock, status)
    assert docker_engine_answers(f"unix://{sock}") is answers
    t.join(5)


def test_no_socket_no_engine_and_no_wait(tmp_path) -> None:
    assert docker_engine_answers(f"unix://{tmp_path / 'absent.sock'}") is False
    with socket.socket() as s:  # a closed TCP port: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert docker_engine_answers(f"tcp://127.0.0.1:{port}") is False
    assert docker_engine_answers("ssh://somewhere") is False


def test_local_cloud_round_trip(local_cloud) -> None:
    kind, settings = local_cloud
    assert kind == ("compose" if use_compose() else "stack")
    s3 = clients.aws_client("s3", settings)
    bucket = f"lc-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    try:
        s3.put_object(Bucket=bucket, Key="k", Body=b"archive")
        assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"archive"
        s3.delete_object(Bucket=bucket, Key="k")
    finally:
        s3.delete_bucket(Bucket=bucket)
    kms = clients.aws_client("kms", settings)
    key = kms.create_key(Description="local cloud fixture")["KeyMetadata"]["Arn"]
    blob = kms.encrypt(KeyId=key, Plaintext=b"x" * 32, EncryptionContext={"tenant": "lc"})["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "lc"})["Plaintext"] == b"x" * 32
    kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    assert clients.elasticsearch_client(settings).cluster.health()["status"] in ("green", "yellow")
