"""Client-agent settings: every field is read from ``FEDHE_AGENT_<FIELD>`` or a CLI flag."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from client_agent.datasets import DataProblems, DataSchema, Dataset, load_dataset
from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.errors import InvalidRequest
from fedhe.settings import resolve_secret
from fedhe.tls import ClientTLS, TLSSettingNames


class DataSettings(BaseSettings):
    """Where a site's data is and how its columns are named: all ``fedhe agent check-data`` needs."""

    model_config = SettingsConfigDict(env_prefix="FEDHE_AGENT_", extra="ignore")

    data_path: str
    label_column: str = "label"
    # A site whose export names the job's features otherwise maps them: job feature name → the
    # site's column (FEDHE_AGENT_COLUMN_MAP='{"alcohol": "Alcohol %"}' or --column alcohol="Alcohol %").
    column_map: dict[str, str] = {}
    validation_fraction: float = 0.2

    def load(self, schema: DataSchema, problems: DataProblems | None = None) -> Dataset:
        """Every row of the site's data as the job's schema reads it."""
        return load_dataset(self.data_path, self.label_column, schema, columns=self.column_map, problems=problems)


class AgentSettings(DataSettings):
    """Configuration of one site's agent."""

    aggregator_url: str = "https://127.0.0.1:8080"
    keyserver_url: str = "https://127.0.0.1:8090"
    tls_ca_file: Path | None = None
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None
    insecure_http: bool = False
    site_id: str
    credential: SecretStr | None = None
    credential_file: Path | None = None
    signing_key_file: Path
    policy_file: Path | None = None
    state_dir: Path = Path("./fedhe-agent-state")
    job_id: str | None = None
    once: bool = False
    poll_interval_s: float = 0.5
    # A site waiting on a round asks the aggregator to answer once it changes, for up to this long.
    round_wait_s: float = Field(default=20.0, ge=0, le=25)
    heartbeat_interval_s: float = 15.0
    max_backoff_s: float = 30.0
    request_timeout_s: float = 60.0
    encrypt_workers: int = 0  # processes encrypting large updates; 0 means one per CPU core
    # Modules (and their submodules) a job's ``custom`` model may be imported from. Importing
    # runs code, so only the site admin names them; a job naming another module is refused.
    custom_modules: list[str] = []
    # Weights this site already holds (.keras, .h5, .npy): a job starting from given weights uses
    # the file whose weights have the job's hash instead of downloading them.
    initial_weights_dir: Path | None = None
    log_level: str = "INFO"

    def client_tls(self) -> ClientTLS:
        """How the agent verifies the services (and, for mutual TLS, the certificate it presents)."""
        return ClientTLS(
            ca_file=self.tls_ca_file,
            cert_file=self.tls_client_cert_file,
            key_file=self.tls_client_key_file,
            insecure_http=self.insecure_http,
            names=TLSSettingNames(
                "FEDHE_AGENT_TLS_CA_FILE", "FEDHE_AGENT_TLS_CLIENT_CERT_FILE", "FEDHE_AGENT_TLS_CLIENT_KEY_FILE"
            ),
        )

    def aggregator_client(self) -> AggregatorClient:
        """The site's client of the aggregator, with its credential."""
        return AggregatorClient(
            self.aggregator_url,
            self.credential_secret().get_secret_value(),
            tls=self.client_tls(),
            timeout=self.request_timeout_s,
            url_setting="FEDHE_AGENT_AGGREGATOR_URL (--aggregator)",
        )

    def keyserver_client(self) -> KeyserverClient:
        """The site's client of the keyserver (its requests are signed, not token-bearing)."""
        return KeyserverClient(
            self.keyserver_url,
            tls=self.client_tls(),
            timeout=self.request_timeout_s,
            url_setting="FEDHE_AGENT_KEYSERVER_URL (--keyserver)",
        )

    def keyserver_audience(self) -> str:
        """The audience the agent's signed requests name: the keyserver URL it was given."""
        return self.keyserver_url.rstrip("/")

    def credential_secret(self) -> SecretStr:
        """The site's API credential issued at approval."""
        return resolve_secret(self.credential, self.credential_file, "FEDHE_AGENT_CREDENTIAL")

    def signing_key_pem(self) -> bytes:
        """The site's Ed25519 signing key (PEM), from the file the site admin named."""
        if not self.signing_key_file.is_file():
            raise InvalidRequest(
                f"FEDHE_AGENT_SIGNING_KEY_FILE (--signing-key) {self.signing_key_file}: no such file",
                code="file_missing",
            )
        return self.signing_key_file.read_bytes()
