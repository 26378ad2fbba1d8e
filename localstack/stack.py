#!/usr/bin/env python3
"""The local cloud: install, start, check and stop the real services on loopback.

    python localstack/stack.py up|status|down [--json] [--only NAME,...]

Standard library only, so it runs before the project's virtualenv exists.

* Installs are cached outside the checkout (``ARCHIVE_KMS_CACHE_DIR``, default
  ``/var/cache/archive-kms`` as root, else ``~/.cache/archive-kms``): virtualenvs,
  ``node_modules``, the Maven repository. A second ``up`` takes seconds.
* Runtime state (data, logs, pid files, TLS material, ``endpoints.json``) lives in the
  stack directory (``ARCHIVE_KMS_STACK_DIR``, default ``<checkout>/.stack``).
* ``up`` is idempotent: a service that already answers its health check is reused.
* A service that does not come up fails ``up`` with its name and its log file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Pinned versions (see docs/adr/): change here and nowhere else.
LOCALSTACK_VERSION_PY313 = "2026.3.0"
LOCALSTACK_VERSION_PY311 = "4.4.0"
AZURITE_VERSION = "3.37.0"
ELASTICSEARCH_VERSION = "9.5.0"
PYKMIP_VERSION = "0.11.0"
ES_USER = "archivekms"  # Elasticsearch refuses to run as root

LOCAL_AWS_KEY = "test"  # LocalStack's documented dummy credentials
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known, publicly documented development key (not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def cache_dir() -> Path:
    env = os.environ.get("ARCHIVE_KMS_CACHE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/archive-kms")
    return Path.home() / ".cache" / "archive-kms"


def stack_dir() -> Path:
    return Path(os.environ.get("ARCHIVE_KMS_STACK_DIR", ROOT / ".stack"))


def port(name: str, default: int) -> int:
    return int(os.environ.get(f"ARCHIVE_KMS_PORT_{name.upper()}", default))


class StackError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[stack] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, logfile: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run an install step, appending its output to ``logfile``; raise naming the log."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if rc != 0:
        raise StackError(f"install step failed (exit {rc}): {' '.join(cmd)} — see {logfile}")


def http_get(url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def tcp_open(host: str, p: int) -> bool:
    try:
        with socket.create_connection((host, p), timeout=1):
            return True
    except OSError:
        return False


def find_python(*versions: str) -> str | None:
    """An interpreter of one of these versions that actually runs (pyenv shims may not)."""
    for v in versions:
        cands = [str(p) for p in sorted(Path("/root/.pyenv/versions").glob(f"{v}.*/bin/python"))]
        cands += [c for c in (shutil.which(f"python{v}"),) if c]
        for exe in cands:
            if subprocess.call([exe, "-c", "import venv"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
                return exe
    return None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs. A zombie (killed, not yet reaped by its new parent) does not count."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants, in MB (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return round(total / 1024, 1)


def make_tls(dirpath: Path, logfile: Path) -> None:
    """A private CA, a server certificate for loopback and a client certificate (KMIP mTLS)."""
    if (dirpath / "client.pem").exists():
        return
    dirpath.mkdir(parents=True, exist_ok=True)
    ossl = ["openssl"]
    run(
        ossl
        + [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=archive-kms local CA",
            "-keyout",
            str(dirpath / "ca.key"),
            "-out",
            str(dirpath / "ca.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        logfile=logfile,
    )
    for name, eku, san in (
        ("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
        ("client", "clientAuth", "DNS:archive-kms"),
    ):
        run(
            ossl
            + [
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                f"/CN={'localhost' if name == 'server' else 'archive-kms'}",
                "-keyout",
                str(dirpath / f"{name}.key"),
                "-out",
                str(dirpath / f"{name}.csr"),
            ],
            logfile=logfile,
        )
        ext = dirpath / f"{name}.ext"
        ext.write_text(f"extendedKeyUsage={eku}\nsubjectAltName={san}\nkeyUsage=digitalSignature,keyEncipherment\n")
        run(
            ossl
            + [
                "x509",
                "-req",
                "-in",
                str(dirpath / f"{name}.csr"),
                "-CA",
                str(dirpath / "ca.pem"),
                "-CAkey",
                str(dirpath / "ca.key"),
                "-CAcreateserial",
                "-days",
                "3650",
                "-extfile",
                str(ext),
                "-out",
                str(dirpath / f"{name}.pem"),
            ],
            logfile=logfile,
        )
    for f in dirpath.glob("*.key"):
        f.chmod(0o600)


@dataclass
class Service:
    name: str
    description: str
    port: int
    install: Callable[[Service], None]
    command: Callable[[Service], tuple[list[str], dict[str, str], Path | None]]
    healthy: Callable[[Service], bool]
    version: Callable[[Service], str]
    endpoints: Callable[[Service], dict[str, object]]
    start_timeout: float = 120.0
    preexec_user: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return stack_dir() / self.name

    @property
    def logfile(self) -> Path:
        return stack_dir() / "logs" / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return stack_dir() / "pids" / f"{self.name}.pid"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None


# ---------------------------------------------------------------- LocalStack (S3, KMS)


def _ls_venv() -> Path:
    return cache_dir() / "localstack-venv"


def ls_install(s: Service) -> None:
    venv = _ls_venv()
    marker = venv / ".archive-kms-installed"
    if marker.exists():
        return
    py313 = find_python("3.13", "3.12")
    # Newer cbor2 (5.7+) drops the private module LocalStack's plugins import, and the
    # pyopenssl LocalStack pins needs cryptography<44: without these pins it fails to start.
    fixes = ["cbor2<5.7", "cryptography<44", "pyopenssl<24.3", "service_identity"]
    if py313:
        py, pins = py313, [f"localstack-core[runtime]=={LOCALSTACK_VERSION_PY313}", *fixes]
    else:  # stack.md: 4.4.0 is the release whose KMS works on 3.11
        py = find_python("3.11") or sys.executable
        pins = [f"localstack-core[runtime]=={LOCALSTACK_VERSION_PY311}", *fixes]
    log(f"installing LocalStack ({pins[0]}) into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    run([py, "-m", "venv", str(venv)], logfile=s.logfile)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pins], logfile=s.logfile)
    marker.write_text(" ".join(pins))


# S3 and KMS for the code; CloudFormation, IAM and STS so the templates of infra/aws deploy
# onto it (tests/infra). Changing this list needs a LocalStack restart (`stack down/up`).
LOCALSTACK_SERVICES = "s3,kms,cloudformation,iam,sts"


def ls_command(s: Service) -> tuple[list[str], dict[str, str], Path | None]:
    data = s.run_dir / "volume"
    data.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        GATEWAY_LISTEN=f"127.0.0.1:{s.port}",
        SERVICES=LOCALSTACK_SERVICES,
        LOCALSTACK_VOLUME_DIR=str(data),
        PERSISTENCE="0",
        SKIP_SSL_CERT_DOWNLOAD="1",
        DISABLE_EVENTS="1",
        LS_LOG="warn",
    )
    env.pop("AWS_CA_BUNDLE", None)
    return [str(_ls_venv() / "bin" / "python"), "-m", "localstack.runtime.main"], env, s.run_dir


def ls_healthy(s: Service) -> bool:
    try:
        code, body = http_get(f"http://127.0.0.1:{s.port}/_localstack/health")
        svcs = json.loads(body).get("services", {}) if code == 200 else {}
        return svcs.get("s3") in ("available", "running") and svcs.get("kms") in ("available", "running")
    except (OSError, ValueError):
        return False


def ls_version(s: Service) -> str:
    try:
        return "localstack " + json.loads(http_get(f"http://127.0.0.1:{s.port}/_localstack/health")[1]).get(
            "version", "?"
        )
    except (OSError, ValueError):
        return "?"


def ls_endpoints(s: Service) -> dict[str, object]:
    return {
        "aws_endpoint_url": f"http://127.0.0.1:{s.port}",
        "aws_region": "us-east-1",
        "aws_access_key_id": LOCAL_AWS_KEY,
        "aws_secret_access_key": LOCAL_AWS_KEY,
        # audit anchors under Object Lock; one day locally (production: a year or more)
        "audit_anchor_bucket": "archive-kms-audit-anchors",
        "audit_anchor_retention_days": 1,
    }


# ---------------------------------------------------------------- Azurite (Blob)


def _azurite_dir() -> Path:
    return cache_dir() / "azurite"


def az_install(s: Service) -> None:
    d = _azurite_dir()
    if (d / "node_modules" / ".bin" / "azurite-blob").exists():
        return
    log(f"installing Azurite {AZURITE_VERSION} into {d}")
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "azurite" / "package.json", d / "package.json")
    shutil.copy(HERE / "azurite" / "package-lock.json", d / "package-lock.json")
    run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], logfile=s.logfile, cwd=d)


# Accounts that stand in for tenants' own storage accounts (Azurite cannot create accounts;
# docs/storage-layout.md, "A tenant's own storage account"). Their keys are derived from
# their names: local emulator credentials, like Azurite's well-known key.
AZURITE_POOL_PREFIX = "akmspool"


def azurite_pool() -> list[tuple[str, str]]:
    """(account, base64 key) of the pool, ``ARCHIVE_KMS_AZURITE_POOL_SIZE`` accounts (64)."""
    import base64
    import hashlib

    size = int(os.environ.get("ARCHIVE_KMS_AZURITE_POOL_SIZE", "64"))
    if not 1 <= size <= 999:
        raise StackError(f"ARCHIVE_KMS_AZURITE_POOL_SIZE must be 1..999, got {size}")
    out = []
    for i in range(1, size + 1):
        name = f"{AZURITE_POOL_PREFIX}{i:03d}"
        key = base64.b64encode(hashlib.sha512(f"archive-kms local Azurite pool account {name}".encode()).digest())
        out.append((name, key.decode()))
    return out


def azurite_accounts_env() -> str:
    """``AZURITE_ACCOUNTS``: the well-known account (Azurite drops it when the variable is
    set) and the pool."""
    return ";".join(f"{a}:{k}" for a, k in [(AZURITE_ACCOUNT, AZURITE_KEY), *azurite_pool()])


def az_command(s: Service) -> tuple[list[str], dict[str, str], Path | None]:
    data = s.run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    return (
        [
            str(_azurite_dir() / "node_modules" / ".bin" / "azurite-blob"),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(s.port),
            "--location",
            str(data),
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ],
        dict(os.environ, AZURITE_ACCOUNTS=azurite_accounts_env()),
        s.run_dir,
    )


def az_healthy(s: Service) -> bool:
    try:  # an unauthenticated list answers 403 from a live Azurite; any HTTP answer will do
        code, _ = http_get(f"http://127.0.0.1:{s.port}/{AZURITE_ACCOUNT}?comp=list")
        return code in (200, 400, 403)
    except OSError:
        return False


def az_version(s: Service) -> str:
    return f"azurite {AZURITE_VERSION}"


def az_endpoints(s: Service) -> dict[str, object]:
    cs = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{s.port}/{AZURITE_ACCOUNT};"
    )
    pool = [
        f"DefaultEndpointsProtocol=http;AccountName={a};AccountKey={k};BlobEndpoint=http://127.0.0.1:{s.port}/{a};"
        for a, k in azurite_pool()
    ]
    return {"azure_blob_connection_string": cs, "azure_account_pool": pool}


# ---------------------------------------------------------------- Elasticsearch


def _es_home() -> Path:
    return cache_dir() / "elasticsearch" / f"elasticsearch-{ELASTICSEARCH_VERSION}"


def _es_java_home() -> str:
    for cand in sorted(Path("/usr/lib/jvm").glob("temurin-2[5-9]*")) + sorted(
        Path("/usr/lib/jvm").glob("java-2[1-9]*")
    ):
        if (cand / "bin" / "java").exists():
            return str(cand)
    if os.environ.get("ES_JAVA_HOME"):
        return os.environ["ES_JAVA_HOME"]
    raise StackError("Elasticsearch 9 needs Java 21+: install a JDK (e.g. temurin-25) or set ES_JAVA_HOME")


def es_install(s: Service) -> None:
    home = _es_home()
    if (home / "bin" / "elasticsearch").exists():
        return
    coords = f"org.elasticsearch.distribution.integ-test-zip:elasticsearch:{ELASTICSEARCH_VERSION}:zip"
    log(f"installing Elasticsearch {ELASTICSEARCH_VERSION} from Maven Central ({coords})")
    run(["mvn", "-B", "-q", "dependency:get", f"-Dartifact={coords}", "-Dtransitive=false"], logfile=s.logfile)
    m2 = Path(os.environ.get("MAVEN_REPO", Path.home() / ".m2" / "repository"))
    zipf = (
        m2
        / "org/elasticsearch/distribution/integ-test-zip/elasticsearch"
        / ELASTICSEARCH_VERSION
        / f"elasticsearch-{ELASTICSEARCH_VERSION}.zip"
    )
    tmp = home.parent / ".unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.unpack_archive(str(zipf), str(tmp))
    for f in (tmp / home.name / "bin").iterdir():
        f.chmod(0o755)
    for d in (tmp / home.name / "jdk",):
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    (tmp / home.name).rename(home)
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.call(["chmod", "-R", "a+rX", str(home.parent)])


def _open_path_for_others(path: Path) -> None:
    """Let a service user (ES, postgres) traverse the directories down to its own."""
    parent = path
    while parent != parent.parent:
        parent = parent.parent
        if parent.stat().st_mode & 0o001 == 0:
            parent.chmod(parent.stat().st_mode | 0o001)


def _ensure_es_user() -> str | None:
    if os.geteuid() != 0:
        return None
    if subprocess.call(["id", ES_USER], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) != 0:
        subprocess.check_call(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ES_USER])
    return ES_USER


def es_command(s: Service) -> tuple[list[str], dict[str, str], Path | None]:
    conf, data, logs, tmp = (s.run_dir / d for d in ("config", "data", "logs", "tmp"))
    if not (conf / "elasticsearch.yml").exists():
        shutil.copytree(_es_home() / "config", conf, dirs_exist_ok=True)
        with (conf / "elasticsearch.yml").open("a") as f:
            # No security plugin configuration: plain HTTP on loopback only. Setting it
            # explicitly also stops the first start from auto-configuring TLS.
            f.write(
                f"\nxpack.security.enabled: false\ndiscovery.type: single-node\nnetwork.host: 127.0.0.1\n"
                f"http.port: {s.port}\ntransport.port: {s.port + 100}\n"
                "cluster.routing.allocation.disk.threshold_enabled: false\naction.destructive_requires_name: false\n"
            )
        (conf / "jvm.options.d").mkdir(exist_ok=True)
        (conf / "jvm.options.d" / "heap.options").write_text("-Xms512m\n-Xmx512m\n")
    for d in (data, logs, tmp):
        d.mkdir(parents=True, exist_ok=True)
    user = _ensure_es_user()
    if user:
        subprocess.check_call(["chown", "-R", user, str(s.run_dir)])
        _open_path_for_others(s.run_dir)
    env = dict(os.environ, ES_PATH_CONF=str(conf), ES_TMPDIR=str(tmp), ES_JAVA_HOME=_es_java_home())
    env.pop("JAVA_HOME", None)
    cmd = [str(_es_home() / "bin" / "elasticsearch"), "-E", f"path.data={data}", "-E", f"path.logs={logs}"]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"] + cmd
    return cmd, env, s.run_dir


def es_healthy(s: Service) -> bool:
    try:
        code, body = http_get(f"http://127.0.0.1:{s.port}/_cluster/health")
        return code == 200 and json.loads(body).get("status") in ("green", "yellow")
    except (OSError, ValueError):
        return False


def es_version(s: Service) -> str:
    try:
        _, body = http_get(f"http://127.0.0.1:{s.port}/_nodes/_local?filter_path=nodes.*.version")
        versions = {n["version"] for n in json.loads(body)["nodes"].values()}
        return "elasticsearch " + ",".join(sorted(versions))
    except (OSError, ValueError, KeyError):
        return "?"


def es_endpoints(s: Service) -> dict[str, object]:
    return {"elasticsearch_url": f"http://127.0.0.1:{s.port}"}


# ---------------------------------------------------------------- Azure Key Vault


def _lowkey_jar() -> str | None:
    jar = os.environ.get("ARCHIVE_KMS_LOWKEY_VAULT_JAR")
    return jar if jar and Path(jar).is_file() else None


def _project_python() -> str:
    venv_py = ROOT / ".venv" / "bin" / "python"
    return str(venv_py) if venv_py.exists() else sys.executable


def kv_install(s: Service) -> None:
    return None  # the emulator ships in this folder and runs on the project's virtualenv


def kv_command(s: Service) -> tuple[list[str], dict[str, str], Path | None]:
    jar = _lowkey_jar()
    if jar:  # opt-in: a Lowkey Vault jar the operator provides (see docs/adr)
        return (
            [
                str(Path(_es_java_home()) / "bin" / "java"),
                "-Xmx256m",
                "-jar",
                jar,
                f"--server.port={s.port}",
                f"--app.token.port={s.port + 1}",
            ],
            dict(os.environ),
            s.run_dir,
        )
    s.run_dir.mkdir(parents=True, exist_ok=True)
    return (
        [
            _project_python(),
            str(HERE / "keyvault_emulator.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(s.port),
            "--state-dir",
            str(s.run_dir),
        ],
        dict(os.environ),
        s.run_dir,
    )


def kv_healthy(s: Service) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # health probe only; clients verify against the CA bundle
    try:
        code, _ = http_get(f"https://127.0.0.1:{s.port}/ping", context=ctx)
        return code == 200
    except OSError:
        return False


def kv_version(s: Service) -> str:
    return (
        f"lowkey-vault ({Path(_lowkey_jar()).name})"
        if _lowkey_jar()
        else "archive-kms keyvault-emulator (Key Vault REST 7.4-7.6)"
    )


def kv_endpoints(s: Service) -> dict[str, object]:
    cert = s.run_dir / "tls" / "cert.pem"
    return {
        "azure_keyvault_url": f"https://localhost:{s.port}",
        "azure_keyvault_ca_bundle": str(cert) if cert.exists() and not _lowkey_jar() else None,
        "azure_keyvault_verify_challenge_resource": False,
    }


# ---------------------------------------------------------------- PyKMIP server (KMIP HSM)


def _kmip_venv() -> Path:
    return cache_dir() / "kmip-venv"


def kmip_install(s: Service) -> None:
    venv = _kmip_venv()
    marker = venv / ".archive-kms-installed"
    if marker.exists():
        return
    log(f"installing PyKMIP server {PYKMIP_VERSION} into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    # Its own venv: the PyKMIP server's SQL layer needs SQLAlchemy 1.x; the project uses 2.x.
    run([find_python("3.11") or sys.executable, "-m", "venv", str(venv)], logfile=s.logfile)
    run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"pykmip=={PYKMIP_VERSION}", "sqlalchemy<2"],
        logfile=s.logfile,
    )
    marker.write_text(PYKMIP_VERSION)


def kmip_command(s: Service) -> tuple[list[str], dict[str, str], Path | None]:
    tls = stack_dir() / "tls"
    make_tls(tls, s.logfile)
    s.run_dir.mkdir(parents=True, exist_ok=True)
    policies = s.run_dir / "policies"
    policies.mkdir(exist_ok=True)
    conf = s.run_dir / "server.conf"
    conf.write_text(
        "[server]\n"
        f"hostname=127.0.0.1\nport={s.port}\n"
        f"certificate_path={tls / 'server.pem'}\nkey_path={tls / 'server.key'}\nca_path={tls / 'ca.pem'}\n"
        "auth_suite=TLS1.2\nenable_tls_client_auth=True\n"
        f"policy_path={policies}\n"
        f"database_path={s.run_dir / 'pykmip.db'}\nlogging_level=INFO\n"
    )
    # Run the entry point through the venv's interpreter: immune to script shebangs.
    launcher = "import sys; from kmip.services.server.server import main; sys.exit(main())"
    return (
        [str(_kmip_venv() / "bin" / "python"), "-c", launcher, "-f", str(conf), "-l", str(s.run_dir / "server.log")],
        dict(os.environ),
        s.run_dir,
    )


def kmip_healthy(s: Service) -> bool:
    tls = stack_dir() / "tls"
    if not (tls / "client.pem").exists():
        return False
    ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    ctx.load_cert_chain(str(tls / "client.pem"), str(tls / "client.key"))
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=2) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost"):
                return True
    except (OSError, ssl.SSLError):
        return False


def kmip_version(s: Service) -> str:
    return f"pykmip-server {PYKMIP_VERSION}"


def kmip_endpoints(s: Service) -> dict[str, object]:
    tls = stack_dir() / "tls"
    return {
        "kmip_host": "127.0.0.1",
        "kmip_port": s.port,
        "kmip_ca_cert": str(tls / "ca.pem"),
        "kmip_client_cert": str(tls / "client.pem"),
        "kmip_client_key": str(tls / "client.key"),
    }


# ---------------------------------------------------------------- PostgreSQL (state store)

PG_DB = "archive_kms"


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        raise StackError("PostgreSQL server binaries not found: apt-get install postgresql")
    return found[-1].parent


def _pg_user() -> str | None:
    return "postgres" if os.geteuid() == 0 else None  # postgres refuses to run as root


def _as_pg(cmd: list[str]) -> list[str]:
    user = _pg_user()
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"] + cmd if user else cmd


def pg_install(s: Service) -> None:
    if not sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        if os.geteuid() != 0:
            raise StackError("PostgreSQL is not installed: apt-get install postgresql")
        log("installing PostgreSQL (Debian package)")
        run(
            ["apt-get", "install", "-y", "-qq", "postgresql"],
            logfile=s.logfile,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
    data = s.run_dir / "data"
    if (data / "PG_VERSION").exists():
        return
    s.run_dir.mkdir(parents=True, exist_ok=True)
    if _pg_user():
        subprocess.check_call(["chown", "-R", _pg_user(), str(s.run_dir)])
        _open_path_for_others(s.run_dir)
    # Loopback only, trust auth: a local development database with no secrets in it.
    run(
        _as_pg([str(_pg_bin() / "initdb"), "-D", str(data), "-U", PG_DB, "--auth=trust", "-E", "UTF8"]),
        logfile=s.logfile,
    )


def pg_command(s: Service) -> tuple[list[str], dict[str, str], Path | None]:
    sock = s.run_dir / "socket"
    sock.mkdir(exist_ok=True)
    if _pg_user():
        subprocess.check_call(["chown", _pg_user(), str(sock)])
    return (
        _as_pg(
            [
                str(_pg_bin() / "postgres"),
                "-D",
                str(s.run_dir / "data"),
                "-p",
                str(s.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(sock),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ]
        ),
        dict(os.environ),
        s.run_dir,
    )


def pg_healthy(s: Service) -> bool:
    try:
        bin_dir = _pg_bin()
    except StackError:
        return False
    ok = subprocess.call([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(s.port), "-q"]) == 0
    if ok:  # the database itself is created once, after the first healthy start
        exists = subprocess.run(
            [
                str(bin_dir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(s.port),
                "-U",
                PG_DB,
                "-d",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname='{PG_DB}'",
            ],
            capture_output=True,
            text=True,
        )
        if exists.returncode == 0 and exists.stdout.strip() != "1":
            subprocess.call([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(s.port), "-U", PG_DB, PG_DB])
    return ok


def pg_version(s: Service) -> str:
    out = subprocess.run([str(_pg_bin() / "postgres"), "--version"], capture_output=True, text=True)
    return out.stdout.strip()


def pg_endpoints(s: Service) -> dict[str, object]:
    return {"postgres_url": f"postgresql+psycopg://{PG_DB}@127.0.0.1:{s.port}/{PG_DB}"}


# ---------------------------------------------------------------- Prefect server (orchestration API)


def _prefect_api_url(s: Service) -> str:
    return f"http://127.0.0.1:{s.port}/api"


def prefect_install(s: Service) -> None:
    # Nothing to install: the server is the Prefect the project venv already has (pyproject),
    # so client and server versions always match. find_spec checks without a slow import.
    has_prefect = "import importlib.util, sys; sys.exit(importlib.util.find_spec('prefect') is None)"
    if subprocess.call([_project_python(), "-c", has_prefect]) != 0:
        raise StackError(f"prefect is not installed for {_project_python()}: create the project venv first (make venv)")


def prefect_command(s: Service) -> tuple[list[str], dict[str, str], Path | None]:
    s.run_dir.mkdir(parents=True, exist_ok=True)
    # Configured only by what is set here: inherited PREFECT_* (a client's PREFECT_API_URL, a
    # profile) must not change where the server keeps its data.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(s.run_dir),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{s.run_dir / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",  # no phoning home from a test stack
        PREFECT_SERVER_UI_ENABLED="true",  # the UI at http://127.0.0.1:<port>/ (the README and demo point at it)
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )  # no per-request access log lines
    return (
        [_project_python(), "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(s.port)],
        env,
        s.run_dir,
    )


def prefect_healthy(s: Service) -> bool:
    try:
        code, _ = http_get(f"{_prefect_api_url(s)}/health")
        return code == 200
    except OSError:
        return False


def prefect_version(s: Service) -> str:
    try:
        code, body = http_get(f"{_prefect_api_url(s)}/admin/version")
        return f"prefect server {json.loads(body)}" if code == 200 else "?"
    except (OSError, ValueError):
        return "?"


def prefect_endpoints(s: Service) -> dict[str, object]:
    return {"prefect_api_url": _prefect_api_url(s)}


# ---------------------------------------------------------------- Prefect worker (runs the deployments)

WORK_POOL = "archive-kms"
DEPLOYMENTS = (
    "migration-enable/enable",
    "migration-remove/remove",
    "migration-support/support",
    "audit-anchor/audit-anchor",
    "key-erase/erase",
    "key-erase-retention/retention",
    "key-rotate/rotate",
    "key-revoke/revoke",
    "key-restore/restore",
    "key-monitor/monitor",
    "archive-job/archive",
)


def _prefect_service() -> Service:
    return next(x for x in SERVICES if x.name == "prefect")


def _api_json(method: str, url: str, body: object | None = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def worker_install(s: Service) -> None:
    prefect_install(s)


def worker_command(s: Service) -> tuple[list[str], dict[str, str], Path | None]:
    """Create the work pool and deploy flows/prefect.yaml on the stack's Prefect server, then
    start a process worker for the pool (its health check on ``s.port``)."""
    server = _prefect_service()
    deadline = time.monotonic() + server.start_timeout
    while not server.healthy(server):  # `stack up` starts services in parallel: wait for the server
        if time.monotonic() > deadline:
            raise StackError("worker: the Prefect server is not healthy: `archive-kms stack up --only prefect,worker`")
        time.sleep(0.5)
    api = _prefect_api_url(server)
    code, _ = _api_json("POST", f"{api}/work_pools/", {"name": WORK_POOL, "type": "process"})
    if code not in (200, 201, 409):
        raise StackError(f"worker: could not create work pool {WORK_POOL} (HTTP {code}) — see {server.logfile}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=api,
        PREFECT_SERVER_EPHEMERAL_ENABLED="false",
        PREFECT_HOME=str(s.run_dir),
        # library log lines (archive_kms.*) in the flow run logs
        PREFECT_LOGGING_EXTRA_LOGGERS="archive_kms",
        PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1",
        PREFECT_WORKER_WEBSERVER_PORT=str(s.port),
        # the flows read the stack's endpoints file, whatever directory they run in
        ARCHIVE_KMS_STACK_DIR=str(stack_dir()),
    )
    s.run_dir.mkdir(parents=True, exist_ok=True)
    deploy = [
        _project_python(),
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--prefect-file",
        "flows/prefect.yaml",
        "--all",
    ]
    run(deploy, logfile=s.logfile, env=env, cwd=ROOT)
    name = f"archive-kms-{socket.gethostname()}-{s.port}"
    cmd = [_project_python(), "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process"]
    return cmd + ["--name", name, "--with-healthcheck"], env, ROOT


def worker_healthy(s: Service) -> bool:
    """The worker answers its health check (it polled the server lately) and the deployments exist."""
    try:
        code, _ = http_get(f"http://127.0.0.1:{s.port}/health")
        if code != 200:
            return False
        api = _prefect_api_url(_prefect_service())
        return all(http_get(f"{api}/deployments/name/{d}")[0] == 200 for d in DEPLOYMENTS)
    except OSError:
        return False


def worker_version(s: Service) -> str:
    return f"prefect process worker, pool {WORK_POOL}, {len(DEPLOYMENTS)} deployments"


def worker_endpoints(s: Service) -> dict[str, object]:
    return {}


SERVICES: list[Service] = [
    Service(
        "localstack",
        "LocalStack (S3, KMS)",
        port("localstack", 4566),
        ls_install,
        ls_command,
        ls_healthy,
        ls_version,
        ls_endpoints,
        start_timeout=180,
    ),
    Service(
        "azurite",
        "Azurite (Blob)",
        port("azurite", 10000),
        az_install,
        az_command,
        az_healthy,
        az_version,
        az_endpoints,
        start_timeout=60,
    ),
    Service(
        "elasticsearch",
        "Elasticsearch (search)",
        port("elasticsearch", 9200),
        es_install,
        es_command,
        es_healthy,
        es_version,
        es_endpoints,
        start_timeout=240,
    ),
    Service(
        "keyvault",
        "Azure Key Vault",
        port("keyvault", 8443),
        kv_install,
        kv_command,
        kv_healthy,
        kv_version,
        kv_endpoints,
        start_timeout=90,
    ),
    Service(
        "kmip",
        "PyKMIP server (KMIP HSM)",
        port("kmip", 5696),
        kmip_install,
        kmip_command,
        kmip_healthy,
        kmip_version,
        kmip_endpoints,
        start_timeout=60,
    ),
    Service(
        "postgres",
        "PostgreSQL (state store)",
        port("postgres", 5433),
        pg_install,
        pg_command,
        pg_healthy,
        pg_version,
        pg_endpoints,
        start_timeout=60,
    ),
    Service(
        "prefect",
        "Prefect server (flow orchestration API)",
        port("prefect", 4200),
        prefect_install,
        prefect_command,
        prefect_healthy,
        prefect_version,
        prefect_endpoints,
        start_timeout=120,
    ),
    Service(
        "worker",
        "Prefect worker (pool archive-kms: enable, remove, support deployments)",
        port("worker", 4210),
        worker_install,
        worker_command,
        worker_healthy,
        worker_version,
        worker_endpoints,
        start_timeout=240,
    ),
]


def select(only: str | None) -> list[Service]:
    if not only:
        return SERVICES
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - {s.name for s in SERVICES}
    if unknown:
        raise StackError(
            f"unknown service(s): {', '.join(sorted(unknown))}; known: {', '.join(s.name for s in SERVICES)}"
        )
    return [s for s in SERVICES if s.name in names]


def start(s: Service) -> dict[str, object]:
    """Install if needed, start unless already healthy, wait for health. Returns a status row."""
    if s.healthy(s):
        return {"service": s.name, "action": "reused", "seconds": 0.0}
    s.install(s)
    pid = s.pid()
    if pid and _started_within(s, s.start_timeout):
        action = "waited"  # another `stack up` started it moments ago: wait instead of starting twice
    else:
        if pid:  # ours, but old and not answering (hung, or half-stopped by hand): replace it
            log(f"{s.name}: pid {pid} is not healthy; stopping it before starting again")
            stop(s)
        cmd, env, cwd = s.command(s)
        if tcp_open("127.0.0.1", s.port) and not _port_frees(s.port, 5.0 if pid else 0.0):
            raise StackError(
                f"{s.name}: port {s.port} is taken by something that is not a healthy {s.description}; "
                f"free it or set ARCHIVE_KMS_PORT_{s.name.upper()}"
            )
        s.logfile.parent.mkdir(parents=True, exist_ok=True)
        s.pidfile.parent.mkdir(parents=True, exist_ok=True)
        out = s.logfile.open("ab")
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        s.pidfile.write_text(str(proc.pid))
        action = "started"
    t0 = time.monotonic()
    while time.monotonic() - t0 < s.start_timeout:
        if s.healthy(s):
            return {"service": s.name, "action": action, "seconds": round(time.monotonic() - t0, 1)}
        if s.pid() is None:
            raise StackError(f"{s.name} ({s.description}) exited while starting — see {s.logfile}")
        time.sleep(0.5)
    raise StackError(f"{s.name} ({s.description}) not healthy after {s.start_timeout:.0f}s — see {s.logfile}")


def write_endpoints() -> Path:
    data: dict[str, object] = {"state_url": f"sqlite:///{stack_dir() / 'state.db'}"}
    for s in SERVICES:
        data.update(s.endpoints(s))
    path = stack_dir() / "endpoints.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)
    return path


def status_rows(services: list[Service]) -> list[dict[str, object]]:
    rows = []
    for s in services:
        pid = s.pid()
        ok = s.healthy(s)
        rows.append(
            {
                "service": s.name,
                "description": s.description,
                "port": s.port,
                "healthy": ok,
                "pid": pid,
                "rss_mb": tree_rss_mb(pid) if pid else None,
                "version": s.version(s) if ok else None,
                "log": str(s.logfile),
            }
        )
    return rows


def cmd_up(services: list[Service], as_json: bool) -> int:
    t0 = time.monotonic()
    failures: list[str] = []
    rows: list[dict[str, object]] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(services)) as pool:
        futures = {pool.submit(start, s): s for s in services}
        for fut in concurrent.futures.as_completed(futures):
            s = futures[fut]
            try:
                row = fut.result()
                rows.append(row)
                log(f"{s.name}: {row['action']} ({row['seconds']}s)")
            except (StackError, OSError, subprocess.SubprocessError) as e:
                failures.append(str(e))
                log(f"FAILED {e}")
    path = write_endpoints()
    if as_json:
        print(
            json.dumps(
                {
                    "services": rows,
                    "failures": failures,
                    "endpoints": str(path),
                    "seconds": round(time.monotonic() - t0, 1),
                },
                indent=2,
            )
        )
    else:
        log(f"endpoints written to {path} ({time.monotonic() - t0:.1f}s)")
    if failures:
        for f in failures:
            print(f"stack up: {f}", file=sys.stderr)
        return 1
    return 0


def cmd_status(services: list[Service], as_json: bool) -> int:
    rows = status_rows(services)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'service':<14}{'state':<10}{'port':<7}{'pid':<9}{'rss MB':<9}version")
        for r in rows:
            state = "healthy" if r["healthy"] else ("DOWN" if not r["pid"] else "UNHEALTHY")
            print(
                f"{r['service']:<14}{state:<10}{r['port']:<7}{r['pid'] or '-'!s:<9}{r['rss_mb'] or '-'!s:<9}"
                f"{r['version'] or ('see ' + str(r['log']))}"
            )
    return 0 if all(r["healthy"] for r in rows) else 1


def _port_frees(p: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if not tcp_open("127.0.0.1", p):
            return True
    return False


def _started_within(s: Service, seconds: float) -> bool:
    try:
        return time.time() - s.pidfile.stat().st_mtime < seconds
    except OSError:
        return False


def stop(s: Service) -> bool:
    """Stop the service's process group: SIGTERM, up to 15 s, then SIGKILL. False if nothing ran."""
    pid = s.pid()
    if not pid:
        s.pidfile.unlink(missing_ok=True)
        return False
    for sig in (signal.SIGTERM, signal.SIGCONT):  # SIGCONT: a stopped process must wake to see SIGTERM
        try:
            os.killpg(pid, sig)
        except OSError:
            pass
    if not _wait_gone(pid, 15.0):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        _wait_gone(pid, 5.0)
    s.pidfile.unlink(missing_ok=True)
    return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def cmd_down(services: list[Service], as_json: bool) -> int:
    stopped = [s.name for s in services if stop(s)]
    if as_json:
        print(json.dumps({"stopped": stopped}))
    else:
        log("stopped: " + (", ".join(stopped) or "nothing was running"))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="archive_kms local cloud")
    ap.add_argument("action", choices=["up", "status", "down", "endpoints"])
    ap.add_argument("--only", help="comma-separated service names")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        services = select(args.only)
    except StackError as e:  # bad input: one line, exit 2 (exit 1 is `status` finding a service down)
        print(f"error: --only: {e}", file=sys.stderr)
        return 2
    try:
        if args.action == "up":
            return cmd_up(services, args.json)
        if args.action == "status":
            return cmd_status(services, args.json)
        if args.action == "endpoints":  # --json: the endpoints themselves; else where they are
            path = write_endpoints()
            print(path.read_text().rstrip() if args.json else path)
            return 0
        return cmd_down(services, args.json)
    except StackError as e:
        print(f"stack: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
