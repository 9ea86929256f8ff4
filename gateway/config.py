"""`GatewayConfig`: what `sovereign gateway` reads from `configs/gateway/*.yaml`, with SOVEREIGN_GATEWAY_* overrides.

`models` maps each base model name (as vLLM serves it) to a pool of replica URLs; adapters are not configured here,
the gateway discovers them from each replica's `/v1/models`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from gateway.finetune_config import FineTuningConfig
from sovereign.settings import HomeSettings, YamlSettings, config_path


class Timeouts(BaseModel):
    """Upstream timeouts in seconds. TTFT: until the first byte of the answer; stall: the longest gap between bytes."""

    model_config = ConfigDict(extra="forbid")

    connect: float = Field(5.0, gt=0)
    ttft: float = Field(120.0, gt=0)
    stall: float = Field(60.0, gt=0)
    total: float = Field(900.0, gt=0)


class GatewayConfig(YamlSettings):
    model_config = SettingsConfigDict(env_prefix="SOVEREIGN_GATEWAY_", extra="forbid", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # None: SQLite under SOVEREIGN_HOME; PostgreSQL for several gateway replicas (postgresql+psycopg://...).
    database_url: str | None = None
    # None: quota counters live in this process; set it when several gateway replicas must share limits.
    redis_url: str | None = None
    # An admin key ensured at start, so `sovereign up` and Kubernetes can hand one out.
    bootstrap_key: SecretStr | None = None
    models: dict[str, list[str]] = Field(default_factory=dict)
    # https:// replicas: the CA bundle (PEM) that signed their certificates; None: the system's trust store.
    replica_ca_file: FilePath | None = None
    # Serve HTTPS with this certificate chain and private key (PEM), for apps on other machines when nothing in front
    # of the gateway terminates TLS; both or neither. The key file's passphrase, if any, in tls_key_password.
    tls_cert_file: FilePath | None = None
    tls_key_file: FilePath | None = None
    tls_key_password: SecretStr | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    health_check_interval_s: float = Field(5.0, gt=0)
    directory_refresh_s: float = Field(0.5, gt=0)
    # How often the PII rules file is read for changes (0: only at start); a change applies after two equal reads.
    pii_rules_refresh_s: float = Field(1.0, ge=0)
    # Reserved against token quotas when a request names no max_tokens and the team sets no cap.
    default_max_tokens_reservation: int = Field(1024, gt=0)
    # Retries on another replica when a failure happens before the first byte (connect error, 502/503).
    retries: int = Field(2, ge=0)
    # Beyond this many requests in flight the gateway answers 503 at once instead of queueing without bound.
    max_inflight: int = Field(4096, ge=1)
    # Proxies in front of the gateway (an ingress controller, a load balancer) whose X-Forwarded-For says where a
    # request came from, for keys bound to networks (CIDRs or addresses); a header from anyone else is ignored.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Where the audit trail goes; None: the same database as keys and teams.
    audit_database_url: str | None = None
    access_log: bool = True
    # /v1/files and /v1/fine_tuning/jobs: upload limit, job runner (local process or Kubernetes Job), concurrency.
    fine_tuning: FineTuningConfig = Field(default_factory=FineTuningConfig)

    @field_validator("models")
    @classmethod
    def _pools_not_empty(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, urls in v.items():
            if not urls:
                raise ValueError(f"model {name!r} has an empty pool; list at least one replica URL")
            for u in urls:
                if not u.startswith(("http://", "https://")):
                    raise ValueError(f"model {name!r}: replica URL {u!r} must start with http:// or https://")
        return {name: [u.rstrip("/").removesuffix("/v1") for u in urls] for name, urls in v.items()}

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        from gateway.origin import parse_networks

        return [str(n) for n in parse_networks(v, "trusted_proxies")]

    @field_validator("bootstrap_key")
    @classmethod
    def _bootstrap_key_strong(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value() and len(v.get_secret_value()) < 24:
            raise ValueError("bootstrap_key must be at least 24 characters (use `sovereign keys generate`)")
        return v if v is not None and v.get_secret_value() else None

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewayConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = "tls_key_file" if self.tls_key_file is None else "tls_cert_file"
            raise ValueError(f"{missing} is missing: HTTPS needs both tls_cert_file and tls_key_file")
        if self.tls_cert_file is not None:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            password = self.tls_key_password.get_secret_value() if self.tls_key_password else None
            try:  # a certificate that does not match its key would otherwise fail only at the first connection
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file, password)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"tls_cert_file {self.tls_cert_file} with tls_key_file {self.tls_key_file}: "
                                 f"{exc}") from None
        return self

    def resolved_audit_url(self) -> str:
        return self.audit_database_url or self.resolved_database_url()

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        home = HomeSettings().home
        return f"sqlite:///{Path(home) / 'gateway.db'}"


def load_gateway_config(path: str | Path | None = None, **overrides) -> GatewayConfig:
    """Load a gateway config; `path` may be a name under configs/gateway/ (e.g. "default") or a file."""
    return GatewayConfig.load(config_path("gateway", path) if path is not None else None, **overrides)
