"""Running fedhe's processes on one machine: free ports, secrets files, start, wait, stop.

Used by ``fedhe demo`` and by the integration tests, so both exercise the real services as
separate processes on loopback.
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

from fedhe.auth import new_token


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_secret(path: Path, value: str) -> Path:
    """Write a secret to a file only its owner can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(value)
    return path


@dataclass(frozen=True)
class ClusterSecrets:
    """Files holding the operator token, the service token and the keyserver's KEK."""

    operator_token_file: Path
    service_token_file: Path
    kek_file: Path

    @classmethod
    def generate(cls, directory: Path) -> ClusterSecrets:
        """Fresh random secrets, written under ``directory``."""
        return cls(
            operator_token_file=write_secret(directory / "operator-token", new_token()),
            service_token_file=write_secret(directory / "service-token", new_token()),
            kek_file=write_secret(directory / "kek", base64.b64encode(os.urandom(32)).decode()),
        )

    @property
    def operator_token(self) -> str:
        """The operator credential."""
        return self.operator_token_file.read_text(encoding="utf-8")


class ManagedProcess:
    """A fedhe subcommand run as a child process with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 (argv is fedhe's own CLI, no shell)
            [sys.executable, "-m", "fedhe.cli", *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_healthy(self, url: str, timeout_s: float = 60) -> None:
        """Block until ``url``/healthz answers 200, or raise with the log's tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
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
    *, port: int, database_url: str, aggregator_url: str, secrets: ClusterSecrets, log_dir: Path
) -> ManagedProcess:
    """Start a keyserver on 127.0.0.1:``port`` and wait until it is healthy."""
    env = {
        "FEDHE_KEYSERVER_DATABASE_URL": database_url,
        "FEDHE_KEYSERVER_AGGREGATOR_URL": aggregator_url,
        "FEDHE_KEYSERVER_KEK_FILE": str(secrets.kek_file),
        "FEDHE_KEYSERVER_OPERATOR_TOKEN_FILE": str(secrets.operator_token_file),
        "FEDHE_KEYSERVER_SERVICE_TOKEN_FILE": str(secrets.service_token_file),
        "FEDHE_KEYSERVER_LOG_LEVEL": "WARNING",
    }
    process = ManagedProcess("keyserver", ["keyserver", "--host", "127.0.0.1", "--port", str(port)], env, log_dir)
    process.wait_healthy(f"http://127.0.0.1:{port}")
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
) -> ManagedProcess:
    """Start an aggregator on 127.0.0.1:``port`` and wait until it is healthy."""
    env = {
        "FEDHE_AGGREGATOR_DATABASE_URL": database_url,
        "FEDHE_AGGREGATOR_KEYSERVER_URL": keyserver_url,
        "FEDHE_AGGREGATOR_OPERATOR_TOKEN_FILE": str(secrets.operator_token_file),
        "FEDHE_AGGREGATOR_SERVICE_TOKEN_FILE": str(secrets.service_token_file),
        "FEDHE_AGGREGATOR_LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    process = ManagedProcess(name, ["aggregator", "--host", "127.0.0.1", "--port", str(port)], env, log_dir)
    process.wait_healthy(f"http://127.0.0.1:{port}")
    return process


@dataclass(frozen=True)
class ProvisionedSite:
    """A registered and approved site's identity files."""

    site_id: str
    credential_file: Path
    signing_key_file: Path

    @property
    def credential(self) -> str:
        """The site's API credential."""
        return self.credential_file.read_text(encoding="utf-8")


def provision_site(aggregator_url: str, operator_token: str, directory: Path, name: str) -> ProvisionedSite:
    """Do what a site admin and an operator do: make a key, register, approve, keep the credential."""
    from fedhe.api_client import AggregatorClient
    from fedhe.auth import generate_signing_key, private_key_to_pem, public_key_b64
    from fedhe.schemas import SiteCreate

    key = generate_signing_key()
    key_file = directory / name / "signing-key.pem"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    write_secret(key_file, private_key_to_pem(key).decode())
    request = SiteCreate(
        name=name,
        organisation=f"{name} demo organisation",
        contact=f"admin@{name}.example",
        public_key=public_key_b64(key),
    )
    with AggregatorClient(aggregator_url) as anonymous:
        site = anonymous.register_site(request)
    with AggregatorClient(aggregator_url, operator_token) as operator:
        approved = operator.approve_site(site.id)
    credential_file = write_secret(directory / name / "credential", approved.credential)
    return ProvisionedSite(site_id=site.id, credential_file=credential_file, signing_key_file=key_file)


def start_agent(
    *,
    site: ProvisionedSite,
    name: str,
    aggregator_url: str,
    keyserver_url: str,
    data_path: Path,
    state_dir: Path,
    job_id: str,
    log_dir: Path,
) -> ManagedProcess:
    """Start a site agent that follows ``job_id`` and exits when it ends."""
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
    return ManagedProcess(name, args, {"FEDHE_AGENT_LOG_LEVEL": "INFO", "TF_CPP_MIN_LOG_LEVEL": "2"}, log_dir)


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
