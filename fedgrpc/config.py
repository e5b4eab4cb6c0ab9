"""Typed configuration: frozen dataclasses checked in ``__post_init__``.

Every default lives here, once: ``fedgrpc.cli`` builds these from argv (its option
defaults are read from these classes) and passes them down; no other module reads argv
or the environment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgrpc.errors import ConfigError
from fedgrpc.types import UpdateKind

AGGREGATIONS = ("samples", "uniform", "digfl")
WIRE_DTYPES = ("float32", "float16", "bfloat16")
VALIDATORS = ("process", "thread")


@dataclass(frozen=True)
class Limits:
    """Input limits of the aggregator; each is checked before memory is allocated."""

    max_chunk_bytes: int = 4 << 20
    """Largest ``data`` field of one chunk (bytes)."""
    max_tensor_bytes: int = 8 << 30
    """Largest single tensor (bytes)."""
    max_submission_bytes: int = 16 << 30
    """Largest whole submission (bytes)."""
    max_streams_per_party: int = 2
    """Concurrent SubmitGradient streams one party may hold open."""
    max_parties: int = 1024
    """Parties that may join."""
    max_inflight_uploads: int = 2
    """Uploads buffered at once (each holds one model-sized float32 buffer); further
    uploads wait for a slot, held back by HTTP/2 flow control."""
    upload_slot_timeout_s: float = 60.0
    """How long an upload waits for a free slot before RESOURCE_EXHAUSTED (s)."""
    upload_idle_s: float = 60.0
    """An upload sending nothing for this long is discarded, its slot freed (s)."""

    def __post_init__(self) -> None:
        for name in (
            "max_chunk_bytes",
            "max_tensor_bytes",
            "max_submission_bytes",
            "max_streams_per_party",
            "max_parties",
            "max_inflight_uploads",
            "upload_slot_timeout_s",
            "upload_idle_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"limit {name} must be positive, got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class RoundConfig:
    """What the engine runs: rounds, quorum, deadlines, update kind, learning rates."""

    rounds: int = 20
    """Number of rounds."""
    min_parties: int = 2
    """Quorum: submissions to close a round at its deadline, and joins to start."""
    expected_parties: int = 0
    """Parties to wait for before round 0 opens (0 = min_parties)."""
    update_kind: UpdateKind = UpdateKind.GRADIENT
    """``gradient`` (FedSGD) or ``delta`` (local steps)."""
    server_lr: float = 0.5
    """Server step size eta for gradient updates."""
    lr: float = 0.05
    """Local SGD learning rate for delta updates."""
    local_steps: int = 0
    """Local SGD steps per round (delta); 0 = local_epochs epochs."""
    local_epochs: int = 1
    """Local epochs per round when local_steps is 0."""
    batch_size: int = 0
    """Local mini-batch size; 0 = the whole local data set (full-batch gradient)."""
    round_timeout_s: float = 60.0
    """Seconds a round stays open before it closes on quorum (or fails)."""
    join_timeout_s: float = 120.0
    """Seconds to wait for the first quorum of joins before the run fails."""
    aggregation: str = "samples"
    """``samples`` (p_i = n_i / sum n), ``uniform`` or ``digfl`` (weights by score)."""
    quorum_retries: int = 0
    """Times a round that missed quorum is reopened before the run stops as failed."""
    seed: int = 0
    """Run seed (initial model, party RNG streams)."""
    model: str = "mlp"
    """Model name (logreg, mlp, cnn) or ``package.module:factory``."""
    model_hidden: int = 64
    """Hidden width of the built-in MLP/CNN."""
    input_shape: tuple[int, ...] = (1, 8, 8)
    """Shape of one input sample."""
    num_classes: int = 10
    """Number of classes."""
    wire_dtype: str = "float32"
    """dtype of float tensors on the wire: float32, float16 or bfloat16."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.min_parties < 1:
            raise ConfigError(f"min_parties must be >= 1, got {self.min_parties}")
        if self.expected_parties < 0:
            raise ConfigError(
                f"expected_parties must be >= 0, got {self.expected_parties}"
            )
        if self.server_lr <= 0 or self.lr <= 0:
            raise ConfigError("learning rates must be positive")
        if self.local_steps < 0 or (self.local_epochs < 1 and self.local_steps == 0):
            raise ConfigError("need local_steps >= 1 or local_epochs >= 1")
        if self.batch_size < 0:
            raise ConfigError(f"batch_size must be >= 0, got {self.batch_size}")
        if self.round_timeout_s <= 0 or self.join_timeout_s <= 0:
            raise ConfigError("timeouts must be positive")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}"
            )
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(
                f"wire dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}"
            )
        object.__setattr__(self, "update_kind", UpdateKind(self.update_kind))

    @property
    def start_parties(self) -> int:
        """Joins needed before round 0 opens."""
        return max(self.min_parties, self.expected_parties)


@dataclass(frozen=True)
class TlsConfig:
    """TLS material; all paths PEM. ``None`` paths mean not configured."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class ServerConfig:
    """The aggregator process: address, run directory, data, security, limits."""

    round: RoundConfig = field(default_factory=RoundConfig)
    address: str = "localhost:50051"
    """host:port to listen on (port 0 = any free port)."""
    run_dir: Path = Path("runs/latest")
    val_data: str = "digits"
    """Validation data (``digits``, ``mnist:DIR``, ``npz:FILE``, ``module:factory``)."""
    val_count: int = 0
    """Use only the first N validation samples (0 = all)."""
    insecure: bool = False
    tls: TlsConfig = field(default_factory=TlsConfig)
    parties_file: Path | None = None
    limits: Limits = field(default_factory=Limits)
    port_file: Path | None = None
    """Write the bound port here once listening (for tests and tools)."""
    keep_serving: bool = False
    """After the last round, keep answering queries until stopped."""
    metrics_address: str | None = None
    """Serve Prometheus metrics on this host:port (port 0 = any); None = off."""
    metrics_port_file: Path | None = None
    """Write the metrics port here once listening (for tests and tools)."""
    grace_period_s: float = 300.0
    """After the last round (or on resuming a finished run), keep answering
    GetStatus/GetContributions and telling reconnecting parties that training is
    done for this long, then exit (s). 0 = exit once every open model stream got its
    done message. ``keep_serving`` makes it unbounded."""
    init_model: Path | None = None
    """Start from these weights (.npz) instead of the seeded initialisation."""
    resume: bool = False
    validator: str = "process"
    """Where the validation passes run: ``process`` (a worker process sharing theta
    and v_t through memory; keeps torch out of the aggregator) or ``thread``."""

    def __post_init__(self) -> None:
        if self.validator not in VALIDATORS:
            raise ConfigError(
                f"validator must be one of {VALIDATORS}, got {self.validator!r}"
            )
        if not self.insecure and self.tls.cert is None:
            raise ConfigError(
                "no TLS certificate given: pass --tls-cert/--tls-key or run with "
                "--insecure"
            )
        if not self.grace_period_s >= 0:
            raise ConfigError(f"grace period must be >= 0 s, got {self.grace_period_s}")


@dataclass(frozen=True)
class ClientConfig:
    """A party: where the aggregator is, who we are, our data, and how patient to be."""

    server: str
    party_id: str
    data: str
    insecure: bool = False
    tls: TlsConfig = field(default_factory=TlsConfig)
    token: str | None = None
    rpc_timeout_s: float = 60.0
    """Deadline of each unary call and of each upload (seconds)."""
    connect_timeout_s: float = 300.0
    """Give up after this long without reaching the aggregator (seconds)."""
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    attack: str = ""
    """Simulated attack (evaluation only), e.g. ``label-flip:0.8``."""
    threads: int = 1
    """torch intra-op threads."""

    def __post_init__(self) -> None:
        if not self.insecure and self.tls.ca is None:
            raise ConfigError(
                "no CA certificate given: pass --tls-ca or run with --insecure"
            )
        if self.rpc_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ConfigError("timeouts must be positive")


@dataclass(frozen=True)
class ObserverConfig(ClientConfig):
    """An operator or payer reading a run (``contributions``, ``status``): impatient."""

    party_id: str = "observer"
    data: str = ""
    rpc_timeout_s: float = 30.0
    connect_timeout_s: float = 60.0


SIMULATE_ROUND = RoundConfig(
    rounds=15,
    update_kind=UpdateKind.DELTA,
    lr=0.1,
    batch_size=16,
    round_timeout_s=60.0,
    join_timeout_s=60.0,
)
"""``fedgrpc simulate``'s training defaults (digits, MLP, local SGD)."""

SIMULATE_TIMEOUT_S = 1800.0
"""``fedgrpc simulate --timeout``: the whole run, and how long its own parties may
take to start and join (s)."""


@dataclass(frozen=True)
class SplitConfig:
    """How a data set is cut into a validation set and attacked party data sets."""

    data: str = "digits"
    """``digits``, ``mnist:DIR``, ``npz:FILE`` or ``package.module:factory``."""
    parties: int = 5
    partition: str = "iid"
    """``iid``, ``dirichlet:ALPHA``, ``quantity:ALPHA`` or ``shards:K``."""
    val_holdout: int = 0
    """Samples held out for validation (0 = the command's default)."""
    train_count: int = 0
    """Use only N training samples (0 = all)."""
    attacks: tuple[str, ...] = ()
    """``IDX=SPEC`` assignments, e.g. ``3=label-flip:0.6``."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.parties < 1:
            raise ConfigError(f"need at least one party, got {self.parties}")
        if self.val_holdout < 0 or self.train_count < 0:
            raise ConfigError("val_holdout and train_count must be >= 0")
        object.__setattr__(self, "attacks", tuple(self.attacks))

    def holdout_for(self, n_samples: int) -> int:
        """The validation hold-out: ``val_holdout``, or 20 % of the data."""
        return self.val_holdout or max(1, n_samples // 5)


SHAPLEY_METHODS = ("auto", "exact", "permutation")


@dataclass(frozen=True)
class ShapleyConfig:
    """``fedgrpc shapley``: which estimator, and its data defaults."""

    method: str = "auto"
    """``exact`` (all coalitions), ``permutation`` (Monte Carlo) or ``auto``."""
    permutations: int = 200
    """Random orders for ``permutation``."""
    threads: int = 1
    """torch intra-op threads per training."""
    parties: int = 4
    digits_val_holdout: int = 360
    """Default hold-out for ``digits`` (20 % of 1797)."""
    val_holdout: int = 2000
    """Default hold-out for every other data set (e.g. MNIST)."""

    def holdout_for(self, data: str) -> int:
        """The default validation hold-out of a data set."""
        return self.digits_val_holdout if data == "digits" else self.val_holdout


def round_config_to_json(cfg: RoundConfig) -> dict[str, Any]:
    """RoundConfig as plain JSON values."""
    out = dataclasses.asdict(cfg)
    out["update_kind"] = cfg.update_kind.value
    out["input_shape"] = list(cfg.input_shape)
    return out


def round_config_from_json(data: dict[str, Any]) -> RoundConfig:
    """Inverse of :func:`round_config_to_json`."""
    fields = {f.name for f in dataclasses.fields(RoundConfig)}
    kw = {k: v for k, v in data.items() if k in fields}
    kw["update_kind"] = UpdateKind(kw.get("update_kind", "gradient"))
    kw["input_shape"] = tuple(kw.get("input_shape", (1, 8, 8)))
    return RoundConfig(**kw)
