"""The one settings object. Only this module reads the environment.

Every field is a command-line flag and an environment variable with the same name:
`kafka.bootstrap` is `--kafka-bootstrap` and `STREAMADAPT_KAFKA_BOOTSTRAP`; top-level `metrics_port`
is `--metrics-port` and `STREAMADAPT_METRICS_PORT`. A flag beats the variable, the variable beats the
default. A bad value stops start-up with one readable line. An unknown `STREAMADAPT_*` variable is logged as
a warning, naming the setting it is closest to: Kubernetes sets `STREAMADAPT_PORT` and the like in every pod
of a namespace with a Service named `streamadapt`, so such variables must not stop the worker.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamadapt.schemas.purchase import FREE_TEXT_MAX_CHARS

ENV_PREFIX = "STREAMADAPT_"

BUILT_IN_FEATURES = "streamadapt.core.features:CategoryFeatures"  # the default feature plug-in
Strategy = Literal["head", "full", "l2sp", "calibrate"]  # how a round fine-tunes (streamadapt.training.finetune)
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A configuration problem, worded for the operator in one line."""


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX + "KAFKA_", frozen=True, extra="forbid")

    bootstrap: str = Field("127.0.0.1:9092", description="comma-separated host:port list of brokers")
    input_topic: str = Field("purchases", min_length=1, description="topic the worker consumes")
    predictions_topic: str = Field("predictions", min_length=1, description="topic predictions go to")
    dlq_topic: str = Field("purchases.dlq", min_length=1, description="topic dead letters go to")
    model_versions_topic: str = Field("model-versions", min_length=1, description="topic of model versions")
    group_id: str = Field("streamadapt", min_length=1, description="consumer group of the workers")
    topic_partitions: int = Field(6, ge=1, description="partitions for topics the worker creates")
    max_poll_records: int = Field(2000, ge=1, description="records per poll, the batch size bound")
    poll_timeout_ms: int = Field(200, ge=1, description="how long one poll waits for records")
    max_in_flight_records: int = Field(8000, ge=1, description="records polled and not yet committed, at most: "
                                       "what a crash can make the next owner re-emit")
    # A fetch that returned at the first byte made the broker answer about a thousand small fetches a second at
    # 5k events/s, and on a machine shared with the broker that CPU was the tail; an idle consumer now asks
    # every fetch-max-wait-ms instead, which costs the broker little.
    fetch_min_bytes: int = Field(65536, ge=1, description="a fetch waits for this much data (or fetch-max-wait-ms)")
    fetch_max_wait_ms: int = Field(5, ge=0, description="longest a fetch waits for fetch-min-bytes: the latency "
                                                        "a quiet stream adds")
    client_id: str = Field("streamadapt", min_length=1, description="client id shown in broker logs")
    session_timeout_ms: int = Field(45_000, ge=6_000, le=300_000,
                                    description="a replica that stops heartbeating (crashed) loses its partitions "
                                                "after this long")
    client: Literal["confluent", "kafka-python"] = Field(
        "confluent", description="client library of the serving loop: confluent (librdkafka, in C), or kafka-python "
                                 "(pure Python: slower, and a higher tail at every rate)")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how clients talk to the brokers: TLS (SSL), SASL, both, or neither")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism (with a SASL_* security protocol)")
    sasl_username: str = Field("", description="SASL user name (with a SASL_* security protocol)")
    sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (masked when settings are printed)")
    ssl_cafile: Path | None = Field(None, description="PEM file of the CA that signed the brokers' certificates")
    ssl_certfile: Path | None = Field(None, description="PEM client certificate, for brokers that require one")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of --kafka-ssl-certfile")
    exactly_once: bool = Field(False, description="produce each batch and commit its offsets in one Kafka "
                                                  "transaction (read with isolation.level=read_committed)")
    transactional_id: str = Field("", description="stable transactional id of this replica with --kafka-exactly-once "
                                                  "(default: <group-id>-<hostname>); unique per replica")

    @property
    def heartbeat_interval_ms(self) -> int:
        """How often a consumer heartbeats: Kafka's default of 3 s (a third of short session timeouts). A
        replica learns from its heartbeat that another one joined or left, so this bounds how long a
        rebalance waits for it."""
        return min(3000, self.session_timeout_ms // 3)

    @model_validator(mode="after")
    def _coherent_security(self) -> "KafkaSettings":
        sasl = self.security_protocol.startswith("SASL_")
        password = self.sasl_password.get_secret_value()
        if sasl and not (self.sasl_username and password):
            raise ValueError(f"security protocol {self.security_protocol} needs STREAMADAPT_KAFKA_SASL_USERNAME "
                             "and STREAMADAPT_KAFKA_SASL_PASSWORD")
        if not sasl and (self.sasl_username or password):
            raise ValueError("a SASL user name or password is set but STREAMADAPT_KAFKA_SECURITY_PROTOCOL is "
                             f"{self.security_protocol}, which does not use SASL")
        tls_files = {"SSL_CAFILE": self.ssl_cafile, "SSL_CERTFILE": self.ssl_certfile, "SSL_KEYFILE": self.ssl_keyfile}
        for name, path in tls_files.items():
            if path is None:
                continue
            if not self.security_protocol.endswith("SSL"):
                raise ValueError(f"STREAMADAPT_KAFKA_{name} is set but the security protocol "
                                 f"{self.security_protocol} does not use TLS")
            if not path.is_file():
                raise ValueError(f"STREAMADAPT_KAFKA_{name} {path} is not a readable file")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("STREAMADAPT_KAFKA_SSL_CERTFILE and STREAMADAPT_KAFKA_SSL_KEYFILE go together")
        return self

    def effective_transactional_id(self, hostname: str) -> str:
        return self.transactional_id or f"{self.group_id}-{hostname}"


class RedisSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX + "REDIS_", frozen=True, extra="forbid")

    url: SecretStr = Field(SecretStr("redis://127.0.0.1:6379/0"),
                           description="redis:// or rediss:// URL, may hold a password (masked when settings are printed)")
    key_prefix: str = Field("streamadapt", min_length=1, description="prefix of every key the worker writes")
    cluster: bool = Field(False, description="the URL names any node of a Redis Cluster (or of a cluster-mode "
                                             "Valkey, Dragonfly or managed cluster)")
    cluster_shards: int = Field(16, ge=1, le=1024, description="with --redis-cluster, how many hash tags users' keys "
                                "spread over: at least the number of masters; fixed once data is written")
    dedupe_ttl_s: int = Field(7 * 86400, ge=60, description="how long an event_id is remembered")
    user_state_ttl_s: int = Field(400 * 86400, ge=60, description="idle time after which a user's state expires "
                                  "(keep it at least the model's user memory, 400 days by default)")
    tls_ca_file: Path | None = Field(None, description="PEM CA that signed the server's certificate, for rediss:// "
                                                       "(default: the system's trusted CAs)")
    tls_certfile: Path | None = Field(None, description="PEM client certificate, for servers with tls-auth-clients")
    tls_keyfile: Path | None = Field(None, description="PEM private key of --redis-tls-certfile")

    @field_validator("key_prefix")
    @classmethod
    def _no_hash_tag(cls, prefix: str) -> str:
        if "{" in prefix or "}" in prefix:
            raise ValueError("must not hold { or }: Redis Cluster would read them as the keys' hash tag")
        return prefix

    @model_validator(mode="after")
    def _coherent_tls(self) -> "RedisSettings":
        scheme = urlsplit(self.url.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"STREAMADAPT_REDIS_URL must start with redis://, rediss:// (TLS) or unix://, not {scheme}://")
        for name, path in {"TLS_CA_FILE": self.tls_ca_file, "TLS_CERTFILE": self.tls_certfile,
                           "TLS_KEYFILE": self.tls_keyfile}.items():
            if path is None:
                continue
            if scheme != "rediss":
                raise ValueError(f"STREAMADAPT_REDIS_{name} is set but STREAMADAPT_REDIS_URL is not a rediss:// (TLS) URL")
            if not path.is_file():
                raise ValueError(f"STREAMADAPT_REDIS_{name} {path} is not a readable file")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("STREAMADAPT_REDIS_TLS_CERTFILE and STREAMADAPT_REDIS_TLS_KEYFILE go together")
        return self

    @property
    def shards(self) -> int:
        """Hash tags the users' keys spread over (streamadapt.state.keys): one on a single Redis."""
        return self.cluster_shards if self.cluster else 1

    def masked_url(self) -> str:
        """The URL with its password masked, in the user part or in a `password=` query parameter (redis-py
        reads both)."""
        url = self.url.get_secret_value()
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.hostname or ""
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else ""))
        if parts.query:
            query = [(name, "***" if name.lower() == "password" else value)
                     for name, value in parse_qsl(parts.query, keep_blank_values=True)]
            parts = parts._replace(query=urlencode(query, safe="*"))
        return urlunsplit(parts)


class MetricsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX + "METRICS_", frozen=True, extra="forbid")

    host: str = Field("0.0.0.0", description="address the metrics/health server binds")
    port: int = Field(9400, ge=0, le=65535, description="port of /metrics, /healthz, /readyz (0 = any free)")


class TrainingSettings(BaseSettings):
    """Label join, windows and the trainer."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX + "TRAINING_", frozen=True, extra="forbid")

    strategy: Strategy = Field("l2sp", description="fine-tune strategy (see README)")
    every_examples: int = Field(2000, ge=1, description="fine-tune after this many new resolved examples")
    every_s: float = Field(600.0, gt=0, description="fine-tune at least this often (seconds, wall time)")
    on_drift: bool = Field(True, description="fine-tune when the drift detector alarms")
    max_lag_s: float = Field(3600.0, ge=0, description="while the stream catches up (a replay, a backlog), a partition "
                             "waits once it runs this far (event time) ahead of the slowest one, or of a due round "
                             "(0 = never)")
    min_examples: int = Field(1000, ge=10, description="no fine-tune with fewer examples of the current regime")
    max_examples: int = Field(20000, ge=10, description="fine-tune on at most the newest this many examples")
    holdout_share: float = Field(0.2, gt=0, lt=0.9, description="newest share of examples held out for the gate")
    promotion_z: float = Field(2.0, ge=0, description="standard errors of its paired holdout log-loss gain a "
                               "candidate needs, over the champion and over the label prior")
    promotion_min_gain: float = Field(0.0, ge=0, description="log-loss gain (nats per example) a candidate needs "
                                      "at least, however significant")
    promotion_ranking_z: float = Field(2.0, ge=0, description="a binary candidate whose holdout AUC is lower than the "
                                       "champion's by more than this many standard errors (DeLong) is refused")
    recalibrate: bool = Field(True, description="after every strategy, fit the candidate's calibration (a scale "
                              "and a bias per class) on its training examples, weighted to the newest")
    epochs: int = Field(30, ge=1, description="at most this many fine-tune epochs (early stopping)")
    patience: int = Field(3, ge=1, description="a fine-tune stops after this many epochs without a better validation loss")
    learning_rate: float = Field(1e-3, gt=0, description="fine-tune learning rate (full uses a tenth)")
    l2sp_weight: float = Field(1e-3, ge=0, description="pull toward the source weights (l2sp)")
    recency_half_life_s: float = Field(14 * 86400.0, gt=0, description="event-time half-life of sample weights")
    lease_ttl_s: float = Field(15.0, gt=1, description="trainer lease; another trainer takes over after it")
    window_s: int = Field(86400, ge=60, description="event-time tumbling window length")
    window_max_examples: int = Field(20000, ge=100, description="examples kept per window")
    window_max_age_s: int = Field(30 * 86400, ge=60, description="windows go this long after their labels are known "
                                  "(the watermark; for repurchase, less the horizon)")
    allowed_lateness_s: float = Field(3600.0, ge=0, description="watermark = newest event time less this")
    idle_partition_timeout_s: float = Field(600.0, gt=0, description="an input partition without events for this "
                                            "long (wall clock) stops holding the watermark back")
    registry_keep_promoted: int = Field(10, ge=1, description="promoted versions the registry keeps besides the "
                                        "champion and the source (what a rollback can go back to)")
    registry_keep_rejected_s: int = Field(86400, ge=0, description="how long the registry keeps a rejected "
                                          "candidate (wall-clock seconds)")
    quality_window: int = Field(2000, ge=10, description="predictions in the rolling live-quality window")
    threads: int = Field(1, ge=0, description="CPU threads a fine-tune may use (0 = all; the trainer also runs niced)")


class Settings(BaseSettings):
    """What `streamadapt run` needs, read once at start-up."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    role: Literal["all", "worker", "trainer"] = Field("all", description="which loops this process runs")
    source_checkpoint: Path | None = Field(None, description="checkpoint directory written by `streamadapt pretrain`")
    features: str = Field(BUILT_IN_FEATURES, description="feature plug-in MODULE:NAME the checkpoint was pretrained "
                                                          "with (docs/extending.md)")
    no_finetune: bool = Field(False, description="serve the source model unchanged (the static baseline)")
    model_name: str = Field("purchases", min_length=1, description="name under which model versions are published")
    processes: int = Field(1, ge=1, le=64, description="serving processes, each a member of the consumer group with "
                           "its share of the partitions; the first serves metrics on --metrics-port, process i on "
                           "--metrics-port + 1 + i")
    max_payload_bytes: int = Field(64 * 1024, ge=256, description="larger input records are dead-lettered")
    max_future_skew_s: int = Field(3600, ge=0, description="events further ahead of the clock are dead-lettered")
    max_past_skew_s: int = Field(3 * 365 * 86400, ge=1, description="events further behind the newest event time seen on "
                                 "their input partition are dead-lettered (relative to the stream, not the clock, so "
                                 "that a historical log can be replayed)")
    max_item_id_chars: int = Field(256, ge=1, le=FREE_TEXT_MAX_CHARS,
                                   description="events with a longer item_id are dead-lettered")
    max_category_chars: int = Field(256, ge=1, le=FREE_TEXT_MAX_CHARS,
                                    description="events with a longer category are dead-lettered")
    dlq_max_bytes: int = Field(256 * 1024, ge=4096, description="a dead letter's key and value take at most this much "
                               "(less if the dead-letter topic's max.message.bytes is smaller): a longer payload or "
                               "key is cut, and the dead letter says so")
    progress_interval_s: float = Field(10.0, gt=0, description="seconds between progress log lines")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="text lines, or one JSON object per line "
                                                "(time, level, logger, message) for a log pipeline")

    kafka: KafkaSettings
    redis: RedisSettings
    metrics: MetricsSettings
    training: TrainingSettings

    def as_environment(self) -> dict[str, str]:
        """Every setting as its environment variable (for a child process; secrets in clear)."""
        values = {}
        for option in OPTIONS:
            value = option.read(self)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is not None:
                values[option.env] = str(value).lower() if isinstance(value, bool) else str(value)
        return values

    def describe(self) -> str:
        """The effective configuration on one line (`VARIABLE=value ...`; an empty value, or one with spaces,
        in double quotes), secrets masked, for the start-up log."""
        return " ".join(f"{env}={_one_word(str(value))}" for env, value in self._env_values())

    def _env_values(self) -> Iterator[tuple[str, Any]]:
        for option in OPTIONS:
            value = option.read(self)
            if option.env == ENV_PREFIX + "REDIS_URL":
                value = self.redis.masked_url()
            elif isinstance(value, SecretStr):
                value = "***" if value.get_secret_value() else ""
            yield option.env, value


PARTS: dict[str, type[BaseSettings]] = {
    "kafka": KafkaSettings, "redis": RedisSettings, "metrics": MetricsSettings, "training": TrainingSettings,
}


class Option(BaseModel):
    """One setting as the CLI and the environment see it."""

    part: str | None  # None for top-level fields
    field: str
    env: str
    flag: str
    description: str
    annotation: Any

    def read(self, settings: Settings) -> Any:
        owner = getattr(settings, self.part) if self.part else settings
        return getattr(owner, self.field)


def _options() -> list[Option]:
    options = []
    for name, info in Settings.model_fields.items():
        if name in PARTS:
            for field, part_info in PARTS[name].model_fields.items():
                options.append(Option(part=name, field=field, env=f"{ENV_PREFIX}{name}_{field}".upper(),
                                      flag=f"--{name}-{field}".replace("_", "-"),
                                      description=part_info.description or "", annotation=part_info.annotation))
        else:
            options.append(Option(part=None, field=name, env=f"{ENV_PREFIX}{name}".upper(),
                                  flag=f"--{name}".replace("_", "-"),
                                  description=info.description or "", annotation=info.annotation))
    return options


OPTIONS: list[Option] = _options()
# Their values are never shown (a bad one included): the settings held as SecretStr.
SECRET_VARIABLES = frozenset(option.env for option in OPTIONS if option.annotation is SecretStr)


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build the settings from defaults, the environment and `overrides` (by env name, e.g. from flags).

    Raises SettingsError with one line naming the variable or flag at fault.
    """
    environ = os.environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    known = {option.env for option in OPTIONS}
    for name in sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known):
        log.warning("%s", unknown_variable_warning(name, known))
    by_part: dict[str | None, dict[str, Any]] = {}
    for option in OPTIONS:
        if option.env in overrides:
            by_part.setdefault(option.part, {})[option.field] = overrides[option.env]
    try:
        # Parts and top level read the environment themselves (pydantic-settings); init values win.
        parts = {name: cls(_env_file=None, **by_part.get(name, {})) for name, cls in PARTS.items()}
        return Settings(_env_file=None, **by_part.get(None, {}), **parts)
    except ValidationError as error:
        raise SettingsError(_one_line(error)) from error


def _one_word(value: str) -> str:
    return value if value and not any(c.isspace() or c == '"' for c in value) else json.dumps(value)


def unknown_variable_warning(name: str, known: set[str]) -> str:
    """What the log says of a `STREAMADAPT_*` variable that names no setting, with the nearest one if any."""
    # compared without the prefix they all share, which would make any two names look alike
    close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), sorted(k.removeprefix(ENV_PREFIX) for k in known),
                                      n=1, cutoff=0.8)
    hint = f"did you mean {ENV_PREFIX}{close[0]}? " if close else ""
    return f"ignoring the environment variable {name}, which names no setting: {hint}`streamadapt run --help` lists them"


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    if not first["loc"]:  # a check across fields: its message names them
        return f"invalid settings: {first['msg'].removeprefix('Value error, ')}"
    part = error.title.lower().removesuffix("settings") if error.title != "Settings" else ""
    field = ".".join(str(x) for x in first["loc"])
    env = f"{ENV_PREFIX}{part + '_' if part else ''}{field}".upper()
    value = first.get("input")
    shown = "***" if env in SECRET_VARIABLES else repr(value)
    return f"invalid setting {env} (flag --{(part + '-' if part else '') + field.replace('_', '-')}) = {shown}: {first['msg']}"
