"""The local cloud from docker-compose.yml when a Docker engine answers, else the no-Docker
stack (``archive-kms stack up``).

``docker_engine_answers()`` asks the engine's ``/_ping`` (``DOCKER_HOST`` if it is a
``unix://`` or ``tcp://`` address, else ``/var/run/docker.sock``) with a short timeout;
without a socket it returns at once, so machines without Docker pay nothing. With an
engine, the fixture in conftest.py starts the compose services it needs through
testcontainers (``ARCHIVE_KMS_TEST_COMPOSE=0`` keeps the no-Docker stack even then).
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from archive_kms.config import PROJECT_ROOT, Settings

#: compose services whose ports the settings point at, and the container port of each
COMPOSE_PORTS = {"localstack": 4566, "azurite": 10000, "elasticsearch": 9200}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def docker_engine_answers(docker_host: str | None = None, timeout: float = 1.0) -> bool:
    host = docker_host if docker_host is not None else os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    url = urlsplit(host)
    if url.scheme == "unix":
        if not os.path.exists(url.path):
            return False
        conn: http.client.HTTPConnection = _UnixConnection(url.path, timeout)
    elif url.scheme == "tcp":
        conn = http.client.HTTPConnection(url.hostname or "localhost", url.port or 2375, timeout=timeout)
    else:
        return False
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def use_compose() -> bool:
    return os.environ.get("ARCHIVE_KMS_TEST_COMPOSE", "1") != "0" and docker_engine_answers()


@contextmanager
def compose_settings(base: Settings) -> Iterator[Settings]:
    """Start the compose services S3/KMS, Blob and search need; Settings pointing at them."""
    from testcontainers.compose import DockerCompose

    with DockerCompose(PROJECT_ROOT, compose_file_name="docker-compose.yml", services=list(COMPOSE_PORTS)) as compose:
        where = {name: compose.get_service_host_and_port(name, port) for name, port in COMPOSE_PORTS.items()}
        ls_host, ls_port = where["localstack"]
        az_host, az_port = where["azurite"]
        es_host, es_port = where["elasticsearch"]
        from pydantic import SecretStr

        sys.path.insert(0, str(PROJECT_ROOT / "localstack"))
        from stack import AZURITE_ACCOUNT, AZURITE_KEY  # the emulator's public development key

        yield base.model_copy(
            update={
                "aws_endpoint_url": f"http://{ls_host}:{ls_port}",
                "azure_blob_connection_string": SecretStr(
                    f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                    f"BlobEndpoint=http://{az_host}:{az_port}/{AZURITE_ACCOUNT};"
                ),
                "elasticsearch_url": f"http://{es_host}:{es_port}",
            }
        )
