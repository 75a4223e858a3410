"""Running fedhe's processes on one machine: free ports, secrets, TLS, start, wait, stop.

Used by ``fedhe demo``, the integration tests and the benchmarks, so all of them exercise the
real services as separate processes on loopback, over TLS with a development CA, each service
with its own admin account.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.auth import generate_signing_key, new_token, private_key_to_pem, public_key_b64
from fedhe.devca import create_ca
from fedhe.files import write_private_text
from fedhe.schemas import MemberCreate, SiteCreate
from fedhe.tls import ClientTLS

LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]

# Every simulated site of a test or benchmark calls from the same address, far more often than
# one real site would: these settings lift the rate limits (tested themselves elsewhere).
UNLIMITED_RATES = {
    f"FEDHE_{service}_{name}": "1000000"
    for service in ("KEYSERVER", "AGGREGATOR")
    for name in ("RATE_LIMIT_PER_ADDRESS", "RATE_LIMIT_PER_CREDENTIAL", "AUTH_FAILURES_PER_ADDRESS")
} | {"FEDHE_AGGREGATOR_REGISTRATIONS_PER_ADDRESS": "1000000", "FEDHE_KEYSERVER_KEY_RELEASES_PER_SITE": "1000000"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def url(port: int) -> str:
    """The HTTPS URL of a service on loopback."""
    return f"https://127.0.0.1:{port}"


@dataclass(frozen=True)
class ClusterSecrets:
    """Everything a local cluster needs that must not be in the repository, as files (0600 keys).

    The keyserver's admin token and the aggregator's are different credentials; the aggregator's
    service token is its identity at the keyserver.
    """

    directory: Path
    kek_file: Path
    keyserver_admin_token_file: Path
    aggregator_admin_token_file: Path
    aggregator_service_token_file: Path
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path

    @classmethod
    def generate(cls, directory: Path) -> ClusterSecrets:
        """Fresh random secrets and a development CA with a loopback server certificate."""
        ca = create_ca(directory)
        server = ca.issue(directory, "server", hosts=LOOPBACK_HOSTS)
        return cls(
            directory=directory,
            kek_file=write_private_text(directory / "kek", base64.b64encode(os.urandom(32)).decode()),
            keyserver_admin_token_file=write_private_text(directory / "keyserver-admin-token", new_token("fht_")),
            aggregator_admin_token_file=write_private_text(directory / "aggregator-admin-token", new_token("fht_")),
            aggregator_service_token_file=write_private_text(directory / "aggregator-service-token", new_token("fht_")),
            ca_file=ca.cert_file,
            server_cert_file=server.cert_file,
            server_key_file=server.key_file,
        )

    @property
    def tls(self) -> ClientTLS:
        """Client TLS trusting the cluster's CA."""
        return ClientTLS(ca_file=self.ca_file)

    @property
    def keyserver_admin_token(self) -> str:
        """The keyserver admin's token."""
        return self.keyserver_admin_token_file.read_text(encoding="utf-8")

    @property
    def aggregator_admin_token(self) -> str:
        """The aggregator admin's token."""
        return self.aggregator_admin_token_file.read_text(encoding="utf-8")

    def keyserver_admin(self, keyserver_url: str) -> KeyserverClient:
        """A keyserver client holding the keyserver admin's token."""
        return KeyserverClient(keyserver_url, self.keyserver_admin_token, tls=self.tls)

    def aggregator_admin(self, aggregator_url: str) -> AggregatorClient:
        """An aggregator client holding the aggregator admin's token."""
        return AggregatorClient(aggregator_url, self.aggregator_admin_token, tls=self.tls)

    def tls_env(self, prefix: str) -> dict[str, str]:
        """The TLS settings of a service (serving the loopback certificate, trusting the CA)."""
        return {
            f"{prefix}_TLS_CERT_FILE": str(self.server_cert_file),
            f"{prefix}_TLS_KEY_FILE": str(self.server_key_file),
            f"{prefix}_TLS_CA_FILE": str(self.ca_file),
        }

    def cli_env(self) -> dict[str, str]:
        """Environment for ``fedhe`` client commands run as both admins."""
        return {
            "FEDHE_CA_FILE": str(self.ca_file),
            "FEDHE_KEYSERVER_TOKEN_FILE": str(self.keyserver_admin_token_file),
            "FEDHE_AGGREGATOR_TOKEN_FILE": str(self.aggregator_admin_token_file),
        }


class ManagedProcess:
    """A fedhe subcommand (or another ``module``'s command line) run as a child process with its
    output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, module: str = "fedhe.cli"):
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 (argv is fedhe's own CLI, no shell)
            [sys.executable, "-m", module, *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_healthy(self, base_url: str, tls: ClientTLS, timeout_s: float = 60) -> None:
        """Block until ``base_url``/healthz answers 200, or raise with the log's tail."""
        deadline = time.monotonic() + timeout_s
        verify = tls.ssl_context()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1, verify=verify).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout_s} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        """The last lines of the process's log."""
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def start_keyserver(
    *,
    port: int,
    database_url: str,
    secrets: ClusterSecrets,
    log_dir: Path,
    name: str = "keyserver",
    extra_env: dict[str, str] | None = None,
    health_tls: ClientTLS | None = None,
) -> ManagedProcess:
    """Start a keyserver on 127.0.0.1:``port`` over TLS and wait until it is healthy.

    ``health_tls`` is how the health check connects (a client certificate, under mutual TLS).
    """
    env = {
        "FEDHE_KEYSERVER_DATABASE_URL": database_url,
        "FEDHE_KEYSERVER_KEK_FILE": str(secrets.kek_file),
        "FEDHE_KEYSERVER_BOOTSTRAP_ADMIN_TOKEN_FILE": str(secrets.keyserver_admin_token_file),
        "FEDHE_KEYSERVER_AGGREGATOR_TOKEN_FILE": str(secrets.aggregator_service_token_file),
        "FEDHE_KEYSERVER_LOG_LEVEL": "WARNING",
        **secrets.tls_env("FEDHE_KEYSERVER"),
        **(extra_env or {}),
    }
    process = ManagedProcess(name, ["keyserver", "--host", "127.0.0.1", "--port", str(port)], env, log_dir)
    process.wait_healthy(url(port), health_tls or secrets.tls)
    return process


def start_aggregator(
    *,
    port: int,
    database_url: str,
    keyserver_url: str,
    secrets: ClusterSecrets,
    log_dir: Path,
    name: str = "aggregator",
    extra_env: dict[str, str] | None = None,
    command: tuple[str, str] = ("fedhe.cli", "aggregator"),
) -> ManagedProcess:
    """Start an aggregator on 127.0.0.1:``port`` over TLS and wait until it is healthy.

    ``command`` is the module run with ``-m`` and its first argument (a test's patched aggregator
    takes the same settings and flags).
    """
    env = {
        "FEDHE_AGGREGATOR_DATABASE_URL": database_url,
        "FEDHE_AGGREGATOR_KEYSERVER_URL": keyserver_url,
        "FEDHE_AGGREGATOR_BOOTSTRAP_ADMIN_TOKEN_FILE": str(secrets.aggregator_admin_token_file),
        "FEDHE_AGGREGATOR_KEYSERVER_TOKEN_FILE": str(secrets.aggregator_service_token_file),
        "FEDHE_AGGREGATOR_LOG_LEVEL": "WARNING",
        **secrets.tls_env("FEDHE_AGGREGATOR"),
        **(extra_env or {}),
    }
    module, first = command
    process = ManagedProcess(name, [first, "--host", "127.0.0.1", "--port", str(port)], env, log_dir, module=module)
    process.wait_healthy(url(port), secrets.tls)
    return process


@dataclass(frozen=True)
class ProvisionedSite:
    """A registered and approved site's identity files."""

    site_id: str
    public_key: str
    credential_file: Path
    signing_key_file: Path

    @property
    def credential(self) -> str:
        """The site's API credential."""
        return self.credential_file.read_text(encoding="utf-8")


def provision_site(
    *,
    aggregator_url: str,
    keyserver_url: str,
    secrets: ClusterSecrets,
    directory: Path,
    name: str,
    federation_id: str | None,
) -> ProvisionedSite:
    """What a site admin and the two admins do: make a key, register, approve, admit to a federation.

    The aggregator admin approves the site (it may talk to the aggregator); the keyserver admin
    admits it to ``federation_id`` with its public key pinned (it may get the key and see jobs).
    """
    key = generate_signing_key()
    key_file = write_private_text(directory / name / "signing-key.pem", private_key_to_pem(key).decode())
    public_key = public_key_b64(key)
    request = SiteCreate(
        name=name, organisation=f"{name} demo organisation", contact=f"admin@{name}.example", public_key=public_key
    )
    with AggregatorClient(aggregator_url, tls=secrets.tls) as anonymous:
        site = anonymous.register_site(request)
    with secrets.aggregator_admin(aggregator_url) as admin:
        approved = admin.approve_site(site.id)
    credential_file = write_private_text(directory / name / "credential", approved.credential)
    provisioned = ProvisionedSite(
        site_id=site.id, public_key=public_key, credential_file=credential_file, signing_key_file=key_file
    )
    if federation_id is not None:
        admit_member(keyserver_url, secrets, federation_id, provisioned, name)
    return provisioned


def admit_member(
    keyserver_url: str, secrets: ClusterSecrets, federation_id: str, site: ProvisionedSite, name: str
) -> None:
    """The keyserver admin adds ``site`` to ``federation_id``, pinning its public key."""
    with secrets.keyserver_admin(keyserver_url) as admin:
        admin.add_member(federation_id, MemberCreate(site_id=site.site_id, public_key=site.public_key, name=name))


def start_agent(
    *,
    site: ProvisionedSite,
    name: str,
    aggregator_url: str,
    keyserver_url: str,
    secrets: ClusterSecrets,
    data_path: Path,
    state_dir: Path,
    job_id: str,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> ManagedProcess:
    """Start a site agent that follows ``job_id`` over TLS and exits when it ends."""
    args = [
        "agent",
        "--aggregator",
        aggregator_url,
        "--keyserver",
        keyserver_url,
        "--site-id",
        site.site_id,
        "--credential-file",
        str(site.credential_file),
        "--signing-key",
        str(site.signing_key_file),
        "--data",
        str(data_path),
        "--state-dir",
        str(state_dir),
        "--job",
        job_id,
        "--once",
    ]
    env = {
        "FEDHE_AGENT_LOG_LEVEL": "INFO",
        "FEDHE_AGENT_TLS_CA_FILE": str(secrets.ca_file),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **(extra_env or {}),
    }
    return ManagedProcess(name, args, env, log_dir)


class RedisServer:
    """A real redis-server of our own on a free port (tests kill and restart it; benchmarks use it)."""

    def __init__(self, workdir: Path):
        """Pick a port; nothing runs until ``start``."""
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server (with no persistence) and wait until it answers."""
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(  # noqa: S603 (fixed argv, no shell)
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
