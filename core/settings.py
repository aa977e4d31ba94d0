"""All configuration in one place: environment variables with the CHESTAID_ prefix."""
from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path

from pydantic import SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
# The sensitivity a flag threshold is chosen for, unless a setting, a command option or the bundle names another.
DEFAULT_TARGET_SENSITIVITY = 0.90


class Settings(BaseSettings):
    """Chest-Aid settings; every field can be set as CHESTAID_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="CHESTAID_", env_file=".env", extra="ignore")

    data_dir: Path = Path("var")
    inbox: Path = Path("inbox")
    database_url: str = ""  # default: SQLite under data_dir
    broker_url: str = ""  # default: kombu's SQLAlchemy transport on SQLite under data_dir (no Redis needed)
    model_dir: Path = REPO_ROOT / "models" / "default"
    max_image_pixels: int = 50_000_000
    # No file larger than this is read anywhere: ingest, the C-STORE receiver, the worker, the web image view.
    max_file_bytes: int = 100_000_000
    # A study claimed this many times without a result (its worker died each time) fails as a poison file.
    max_claims: int = 3
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    # Local performance monitoring (core.monitoring): alerts need this many reviewed cases, are
    # measured on the latest monitor_window_cases of them, and drift on the scores of the last days.
    monitor_min_cases: int = 100
    monitor_window_cases: int = 300
    monitor_max_ece: float = 0.05
    monitor_max_psi: float = 0.25
    monitor_drift_days: int = 30
    max_wait_minutes: int = 60  # a study unread this long is overdue and rises above unflagged studies
    stable_seconds: float = 1.0  # a file's size must stay unchanged this long before it is read
    # After recording a film, wait up to this long for a sender still holding it open for writing to close it.
    writer_grace_seconds: float = 10.0
    requeue_after_seconds: int = 300  # a study is re-sent at most once per period, if lost (core.intake.staleness)
    worker_heartbeat_seconds: int = 10
    worker_alive_seconds: int = 60
    # A claim older than this is re-sent by the stale sweep even though its worker still beats (a hung task).
    claim_timeout_seconds: int = 1800
    # Pool processes of `chestaid worker`; 0 = one per core on a CPU (each with one torch thread, up to 8), one on
    # a GPU (core.ml.threads). The cores are shared out among the processes as torch threads.
    worker_concurrency: int = 0
    # Studies scored in one forward pass when a burst is queued; 0 = the best batch measured on this device.
    score_batch_size: int = 0
    # Inference precision: "auto" times each mode this device and bundle allow and keeps the fastest
    # (core.ml.precision); "fp32", "bf16" (CPU, only if the bundle's check allows), "tf32" or "fp16" (CUDA) force one.
    precision: str = "auto"
    task_max_retries: int = 3
    broker_visibility_timeout: int = 600  # Redis: redeliver unacked tasks of a dead worker after this
    debug_task_delay_seconds: float = 0.0  # fault-injection tests only: each claimed batch sleeps this long
    # Fault-injection tests only: a worker process exits at once (os._exit) when it loads a study whose
    # source_name contains this marker, as a decoder crash or the OOM killer would end it.
    debug_crash_marker: str = ""
    task_queue: str = "chestaid"  # broker queue the ingester sends to and workers consume
    web_host: str = "127.0.0.1"
    web_port: int = 8000
    refresh_seconds: int = 5
    # A study page open elsewhere shows as "open by X" until its page has not checked in for this long.
    reading_claim_seconds: int = 120
    # Every list is paged, so a page costs the same at any size: rows per page by default, and the most a
    # client may ask for.
    page_size: int = 50
    max_page_size: int = 200
    # The worklist page's other sections (in progress, refused, failed, duplicates) show this many rows a page
    # under the list to read, each with its count and "Next" pages: the page a reader keeps open stays short and
    # cheap to refresh every few seconds however many failures a year has collected.
    side_page_size: int = 10
    # C-STORE receiver: loopback unless set (e.g. 0.0.0.0) for modalities and PACS on the network.
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    dicom_ae_title: str = "CHESTAID"
    # Calling AE titles accepted (JSON list in the env, e.g. '["PACS1"]'); empty = every association is refused.
    dicom_allowed_aes: list[str] = []
    # Sign-in throttling against password guessing: failures counted in the database, so it holds across web processes.
    # Per (account, client) pair, with no lock-out: after login_failures_before_delay failures each further
    # try from that client for that account waits base * 2^(extra failures) seconds (at most the max), so a
    # stranger guessing never blocks the owner signing in from elsewhere. Failures are remembered this long.
    login_failures_before_delay: int = 5
    login_delay_base_seconds: float = 1.0
    login_delay_max_seconds: float = 3600.0
    login_failure_memory_seconds: int = 86_400
    # Per client, across all accounts (password spraying): at most this many failures per window.
    login_max_failures_per_client: int = 20
    login_throttle_window_seconds: int = 900
    # Reverse proxies (IP addresses or networks) whose X-Forwarded-For is believed; empty: none, the client
    # is the TCP peer (JSON list in the env, e.g. CHESTAID_TRUSTED_PROXIES='["10.0.0.5", "172.16.0.0/12"]').
    trusted_proxies: list[str] = []
    # Web sessions: signed cookies. An empty secret is generated once and kept in
    # data_dir/session_secret (mode 0600), shared by the web processes of one machine; deployments with
    # web processes on several machines must set CHESTAID_SESSION_SECRET to the same value on each.
    session_secret: SecretStr = SecretStr("")
    session_idle_minutes: int = 30  # signed out after this long without a click (background polling does not count)
    session_max_hours: int = 12  # signed out this long after signing in, however active
    force_https_cookies: bool = False  # mark cookies Secure even when the app sees plain HTTP (TLS ends at a proxy)
    max_request_bytes: int = 1_048_576  # larger request bodies are refused with 413
    # Feedback export: patients appear only as HMAC-SHA256(salt, PatientID). An empty salt is
    # generated once and kept in data_dir/pseudonym_salt (mode 0600); keep it (and back it up) so the keys
    # of one patient stay the same across exports, and set the same value everywhere exports are compared.
    pseudonym_salt: SecretStr = SecretStr("")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or network") from None
        return [entry.strip() for entry in value]

    @model_validator(mode="after")
    def _defaults(self) -> "Settings":
        self.data_dir = self.data_dir.resolve()
        self.inbox = self.inbox.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'chestaid.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        return self

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def heatmap_dir(self) -> Path:
        return self.data_dir / "heatmaps"

    def ensure_dirs(self) -> None:
        """Creates the folders the service writes to."""
        for d in (self.data_dir, self.inbox, self.archive_dir, self.quarantine_dir, self.heatmap_dir):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """Returns the process-wide settings (read once from the environment)."""
    return Settings()
