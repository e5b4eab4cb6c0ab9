"""Typed configuration: frozen dataclasses checked in ``__post_init__``.

Every default lives here, once: ``fedgrpc.cli`` builds these from argv (its option
defaults are read from these classes) and passes them down; no other module reads argv
or the environment.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgrpc.errors import ConfigError
from fedgrpc.types import UpdateKind

AGGREGATIONS = (
    "samples",
    "uniform",
    "digfl",
    "median",
    "trimmed-mean",
    "krum",
    "fltrust",
)
SERVER_OPTIMISERS = ("sgd", "avgm", "adagrad", "adam", "yogi")
WIRE_DTYPES = ("float32", "float16", "bfloat16")


def parse_norm_bound(text: str) -> float | None:
    """``auto`` -> None (derived per round), ``off`` -> inf, else a positive VALUE.

    Raises:
        ValueError: anything else, naming what is accepted.
    """
    value = str(text).strip().lower()
    if value == "auto":
        return None
    if value == "off":
        return math.inf
    try:
        bound = float(value)
    except ValueError:
        raise ValueError(
            f"norm bound must be auto, off or a positive number, got {text!r}"
        ) from None
    if not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"norm bound must be a positive finite number, got {text!r}")
    return bound


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
    max_num_samples: int = 1 << 40
    """Largest sample count a party may claim: the sum over max_parties parties still
    fits the ledger's 64-bit integers and stays exact in a float64 weight."""
    upload_min_rate_bytes_s: float = 64 << 10
    """Slowest average upload rate tolerated after ``upload_grace_s`` (bytes/s of
    wire data); a slower upload is discarded, its slot freed. Together with the
    grace it sets every upload's overall deadline: grace + model bytes / rate."""
    upload_grace_s: float = 30.0
    """Time an upload stream gets before its rate is judged, and the longest the
    server waits for its first (header) message (s)."""
    max_concurrent_streams: int = 0
    """Long-lived streams (GetModel, SubmitGradient) open at once, server-wide;
    more get RESOURCE_EXHAUSTED at once. 0 = 2 x max_parties + 8."""
    max_concurrent_unary: int = 32
    """Unary calls (Join, GetStatus, GetContributions) in progress at once,
    server-wide; more get RESOURCE_EXHAUSTED at once."""
    max_unary_per_identity: int = 8
    """Unary calls of one method one caller may have in progress at once."""

    @property
    def stream_cap(self) -> int:
        """The server-wide cap on long-lived streams."""
        return self.max_concurrent_streams or 2 * self.max_parties + 8

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
            "max_num_samples",
            "upload_min_rate_bytes_s",
            "upload_grace_s",
            "max_concurrent_unary",
            "max_unary_per_identity",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"limit {name} must be positive, got {getattr(self, name)}"
                )
        if self.max_concurrent_streams < 0:
            raise ConfigError(
                "limit max_concurrent_streams must be >= 0 (0 = automatic), got "
                f"{self.max_concurrent_streams}"
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
    norm_bound: str = "auto"
    """Per-round bound on each update's L2 norm, applied before aggregation and
    scoring: ``auto`` (norm_bound_factor x the round's median norm), ``off``, or a
    fixed positive VALUE (DESIGN §4)."""
    norm_bound_factor: float = 1.25
    """k of the ``auto`` norm bound B_t = k x median non-zero update norm (chosen by
    scripts/bench_manipulation.py: the largest k at which scaling gains <= 1.25x)."""
    claim_cap: float = 1.25
    """Unattested sample counts weigh at most this many times the joined parties'
    median claim (0 = no cap); attest counts in the parties file to weigh more."""
    momentum: float = 0.0
    """Local SGD momentum in [0, 1) for delta updates (as torch.optim.SGD; 0 = off)."""
    weight_decay: float = 0.0
    """Local L2 weight decay for delta updates (as torch.optim.SGD; 0 = off)."""
    prox_mu: float = 0.0
    """FedProx mu: (mu/2)||theta - theta_t||^2 joins the local loss (delta; 0 = off)."""
    server_opt: str = "sgd"
    """Server optimiser on the pseudo-gradient: sgd (plain), avgm (FedAvgM), adagrad,
    adam, yogi (Reddi et al. 2021)."""
    server_opt_lr: float = 0.0
    """Its step size eta_s (0 = the optimiser's default: 1 for avgm, 0.03 for the
    adaptive ones)."""
    server_beta1: float = 0.9
    """Server momentum / first-moment decay beta1 in [0, 1) (avgm, adagrad, adam,
    yogi)."""
    server_beta2: float = 0.99
    """Second-moment decay beta2 in [0, 1) (adam, yogi)."""
    server_tau: float = 1e-3
    """Adaptivity tau > 0 of adagrad, adam and yogi: scale eta_s / (sqrt(v) + tau)."""
    trim_beta: float = 0.1
    """trimmed-mean: the fraction dropped at each end per coordinate, in [0, 0.5)."""
    krum_f: int = 1
    """krum: Byzantine parties tolerated (needs >= f + 3 updates per round)."""
    krum_m: int = 0
    """krum: updates averaged (multi-Krum; 0 = n - f)."""
    strategy: str = ""
    """A custom strategy: ``package.module:factory`` returning a
    fedgrpc.strategies.Strategy (given this config); "" = the built-in one named by
    aggregation and server_opt."""
    sample_fraction: float = 1.0
    """Client sampling: the fraction of joined parties asked to train each round."""
    sample_count: int = 0
    """Client sampling: parties asked per round (overrides sample_fraction; 0 = off)."""
    sample_min: int = 0
    """Client sampling: at least this many per round (0 = min_parties)."""
    buffer_size: int = 0
    """FedBuff: apply a step every K accepted updates, whatever model version they
    were computed on (0 = synchronous rounds)."""
    max_staleness: int = 4
    """FedBuff: updates computed on a model more than this many versions old are
    refused."""
    staleness_exponent: float = 0.5
    """FedBuff: an update tau versions old enters as (1 + tau)^-a times itself."""

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
        try:
            parse_norm_bound(self.norm_bound)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not (self.norm_bound_factor >= 1.0 and self.norm_bound_factor < 1e6):
            raise ConfigError(
                f"norm_bound_factor must be in [1, 1e6), got {self.norm_bound_factor}"
            )
        if not (self.claim_cap == 0 or 1.0 <= self.claim_cap < 1e6):
            raise ConfigError(
                f"claim_cap must be 0 (off) or in [1, 1e6), got {self.claim_cap}"
            )
        _check_local_optimiser(self)
        _check_strategy(self)

    @property
    def sampling(self) -> bool:
        """Whether rounds ask a sampled subset of the joined parties."""
        return self.sample_count > 0 or self.sample_fraction < 1.0

    def asked_per_round(self, joined: int) -> int:
        """Parties asked to train per round out of ``joined`` (client sampling).

        sample_count, or ceil(sample_fraction x joined), at least sample_min and
        min_parties (fewer could never reach the quorum), at most ``joined``;
        ``joined`` without sampling.
        """
        if not self.sampling:
            return joined
        # round(): 0.14 * 50 is 7.000000000000001, which must ask 7 parties, not 8.
        frac = math.ceil(round(self.sample_fraction * joined, 9))
        want = self.sample_count or frac
        return min(joined, max(want, self.sample_min, self.min_parties))

    @property
    def buffered(self) -> bool:
        """FedBuff: asynchronous, a step every ``buffer_size`` updates."""
        return self.buffer_size > 0

    @property
    def start_parties(self) -> int:
        """Joins needed before round 0 opens."""
        return max(self.min_parties, self.expected_parties)


_LOCAL_OPTIMISER_OPTIONS = (
    ("momentum", "--momentum"),
    ("weight_decay", "--weight-decay"),
    ("prox_mu", "--prox-mu"),
)


def _check_local_optimiser(cfg: RoundConfig) -> None:
    """Momentum, weight decay and prox mu: finite, >= 0, momentum < 1, delta only.

    Messages name the command-line option, which is where these values come from.
    """
    for name, option in _LOCAL_OPTIMISER_OPTIONS:
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{option} must be a finite number >= 0, got {value}")
    if cfg.momentum >= 1:
        raise ConfigError(f"--momentum must lie in [0, 1), got {cfg.momentum}")
    # A gradient (FedSGD) update is one gradient at theta_t: no local steps for
    # momentum, decay or a proximal pull to act on. The server's step is its own.
    if cfg.update_kind is not UpdateKind.DELTA:
        for name, option in _LOCAL_OPTIMISER_OPTIONS:
            if getattr(cfg, name):
                raise ConfigError(f"{option} needs --update-kind delta")


def _check_strategy(cfg: RoundConfig) -> None:
    """Check the server optimiser, robust-rule, sampling and FedBuff settings.

    Messages name the command-line option.
    """
    if cfg.server_opt not in SERVER_OPTIMISERS:
        raise ConfigError(
            f"--server-opt must be one of {', '.join(SERVER_OPTIMISERS)}, got "
            f"{cfg.server_opt!r}"
        )
    checks = (
        (
            math.isfinite(cfg.server_opt_lr) and cfg.server_opt_lr >= 0,
            "--server-opt-lr",
            "a number >= 0",
        ),
        (0.0 <= cfg.server_beta1 < 1.0, "--server-beta1", "in [0, 1)"),
        (0.0 <= cfg.server_beta2 < 1.0, "--server-beta2", "in [0, 1)"),
        (math.isfinite(cfg.server_tau) and cfg.server_tau > 0, "--server-tau", "> 0"),
        (0.0 <= cfg.trim_beta < 0.5, "--trim-beta", "in [0, 0.5)"),
        (cfg.krum_f >= 0, "--krum-f", ">= 0"),
        (cfg.krum_m >= 0, "--krum-m", ">= 0"),
        (0.0 < cfg.sample_fraction <= 1.0, "--sample-fraction", "in (0, 1]"),
        (cfg.sample_count >= 0, "--sample-count", ">= 0"),
        (cfg.sample_min >= 0, "--sample-min", ">= 0"),
        (cfg.buffer_size >= 0, "--buffer-size", ">= 0"),
        (cfg.max_staleness >= 0, "--max-staleness", ">= 0"),
        (
            math.isfinite(cfg.staleness_exponent) and cfg.staleness_exponent >= 0,
            "--staleness-exponent",
            ">= 0",
        ),
    )  # fmt: skip
    for ok, option, what in checks:
        if not ok:
            raise ConfigError(f"{option} must be {what}")
    if cfg.aggregation == "digfl" and (cfg.server_opt != "sgd" or cfg.buffered):
        raise ConfigError(
            "--aggregation digfl reweights the plain step: it needs --server-opt sgd "
            "and synchronous rounds (no --buffer-size)"
        )
    if cfg.buffered and cfg.sampling:
        raise ConfigError(
            "--buffer-size (FedBuff) and client sampling do not combine: with FedBuff "
            "every party trains continuously"
        )
    if cfg.sample_count and cfg.sample_count < cfg.min_parties:
        raise ConfigError(
            f"--sample-count {cfg.sample_count} is below --min-parties "
            f"{cfg.min_parties}: no round could reach its quorum"
        )
    if cfg.buffered and cfg.buffer_size < cfg.min_parties:
        raise ConfigError(
            f"--buffer-size {cfg.buffer_size} is below --min-parties {cfg.min_parties}"
        )


@dataclass(frozen=True)
class TlsConfig:
    """TLS material; all paths PEM. ``None`` paths mean not configured."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False


def check_address(address: str) -> None:
    """Raise ConfigError unless ``address`` is ``host:port`` with a valid port.

    gRPC would otherwise bind a random port for ``host:99999`` without a word.
    """
    if address.startswith("unix:"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"address {address!r}: expected HOST:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"address {address!r}: port {port!r} is not a number from 0 to 65535"
        )


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
    publish_to_parties: bool = False
    """Let parties see global figures (shares, round metrics, other party ids);
    by default a party sees only its own rows (DESIGN §5)."""
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
    worker_restarts: int = 1
    """Times a validation worker that died is replaced by a fresh one before the
    run stops (resumable: the parties keep waiting)."""
    open_enrolment: bool = False
    """TLS with neither a parties file nor client certificates: every caller may
    join as any party id. Refused unless asked for; no contributions are served."""

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
        check_address(self.address)
        anonymous = self.parties_file is None and not self.tls.require_client_cert
        if not self.insecure and anonymous and not self.open_enrolment:
            raise ConfigError(
                "TLS without a parties file or client certificates would let anyone "
                "join and upload as any party: pass --parties-file, or "
                "--require-client-cert with --tls-ca, or --open-enrolment to accept "
                "that"
            )
        if self.open_enrolment and (self.insecure or not anonymous):
            raise ConfigError(
                "--open-enrolment applies only to TLS without a parties file or "
                "client certificates"
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
    max_refused_rounds: int = 3
    """Consecutive rounds whose upload is refused as INVALID_ARGUMENT before the
    party gives up (a RESOURCE_EXHAUSTED refusal only skips the round)."""
    tls_server_name: str = ""
    """Name to check the aggregator's certificate against, when it differs from the
    host in ``server`` (e.g. reaching a DNS-named certificate by IP)."""

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

SIMULATE_BACKENDS = ("processes", "ray")
"""``fedgrpc simulate --backend``: one process per party, or virtual parties on Ray."""


@dataclass(frozen=True)
class RayPoolConfig:
    """``simulate --backend ray``: the pool of Ray actors hosting virtual parties."""

    actors: int = 0
    """Ray actors (worker processes) hosting the parties; 0 = one per core, at most
    one per party."""
    join_slots: int = 16
    """Joins in flight at once over the whole pool: the aggregator refuses unary
    calls beyond its ``max_concurrent_unary`` (32) with RESOURCE_EXHAUSTED."""
    work_slots: int = 4
    """Parties of one actor that train and upload at once; the others wait for a
    slot with their model (the aggregator admits 8 uploads waiting for their
    header per connection, and an actor's parties share one)."""
    object_store_bytes: int = 100 << 20
    """Ray's shared-memory object store; only small JSON messages pass through it."""

    def __post_init__(self) -> None:
        if self.actors < 0:
            raise ConfigError(
                f"ray actors must be >= 0 (0 = one per core), got {self.actors}"
            )
        if self.join_slots < 1 or self.work_slots < 1:
            raise ConfigError(
                f"ray join and work slots must be >= 1, got {self.join_slots} and "
                f"{self.work_slots}"
            )
        if self.object_store_bytes < 80 << 20:
            raise ConfigError(
                "Ray's object store needs at least 80 MiB, got "
                f"{self.object_store_bytes} bytes"
            )


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
    # Runs recorded before the bounds existed resume as they started: unbounded.
    kw.setdefault("norm_bound", "off")
    kw.setdefault("claim_cap", 0.0)
    return RoundConfig(**kw)
