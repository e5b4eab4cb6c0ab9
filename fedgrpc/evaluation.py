"""Ground truth for DIG-FL: Shapley values by retraining every coalition (DESIGN §4).

Every coalition S of the parties is trained with the same in-process engine
(:func:`fedgrpc.runtime.run_in_process`, no network), the same data per party, the same
seed and the same initial model θ_0. Its utility is the validation-loss drop
v(S) = L_v(θ_0) - L_v(θ_T^S) (and, second, the accuracy gain). Exact Shapley weights,
no clipping. DIG-FL's estimate comes for free from one run of the full federation; the
ratio of the two wall times is the point of the comparison.

No grpc here: the ``shapley`` command is a thin layer over :func:`evaluate`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, TextIO

import numpy as np
import torch

from fedgrpc import contribution
from fedgrpc.config import RoundConfig
from fedgrpc.datasets import partition
from fedgrpc.datasets.attacks import Attack, apply_data_attack
from fedgrpc.datasets.sources import Dataset, load_dataset, split_holdout, subset
from fedgrpc.errors import ConfigError
from fedgrpc.runtime import FlatValidator, config_for_data, run_in_process, setup_model
from fedgrpc.training import Evaluator
from fedgrpc.types import RoundResult

log = logging.getLogger(__name__)

Method = Literal["auto", "exact", "permutation"]
METHODS: tuple[str, ...] = ("auto", "exact", "permutation")

AUTO_EXACT_MAX_PARTIES = 10
"""``method="auto"`` enumerates all 2^n - 1 coalitions up to this many parties."""

PARTY_PREFIX = "party-"

# Independent RNG streams per purpose, so e.g. changing train_count keeps the holdout.
_STREAM_HOLDOUT = 0
_STREAM_TRAIN_COUNT = 1
_STREAM_PARTITION = 2
_STREAM_ATTACK = 3

ProgressFn = Callable[[int, int], None]


# ------------------------------------------------------------------------------------
# Parties


def party_ids(n_parties: int) -> list[str]:
    """Party ids ``party-0 .. party-{n-1}``."""
    return [f"{PARTY_PREFIX}{i}" for i in range(n_parties)]


def resolve_attacks(
    attacks: Mapping[str, Attack], ids: Sequence[str]
) -> dict[str, Attack]:
    """Key attacks by party id; a key may be an id (``party-3``) or an index (``3``).

    Raises:
        ConfigError: a key naming no party, or one party given two attacks.
    """
    known = set(ids)
    out: dict[str, Attack] = {}
    for key, attack in attacks.items():
        k = key.strip()
        if k in known:
            pid = k
        elif k.isdigit() and f"{PARTY_PREFIX}{int(k)}" in known:
            pid = f"{PARTY_PREFIX}{int(k)}"
        else:
            raise ConfigError(
                f"attack {key}={attack.spec}: no such party; parties are "
                f"{_id_range(ids)} (or their indices)"
            )
        if pid in out:
            raise ConfigError(
                f"party {pid} is given two attacks: {out[pid].spec!r} "
                f"and {attack.spec!r}"
            )
        out[pid] = attack
    return out


def _id_range(ids: Sequence[str]) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 2 else ", ".join(ids)


def prepare_parties(
    data_spec: str,
    n_parties: int,
    partition_spec: str,
    val_holdout: int,
    attacks: Mapping[str, Attack],
    seed: int,
    train_count: int = 0,
) -> tuple[dict[str, Dataset], Dataset]:
    """Load a data set and cut it into a validation set and attacked party data sets.

    The single place that turns (data, partition, attacks, seed) into party data, so
    ``simulate``, ``split`` and ``shapley`` agree on who holds what. Steps, each with
    its own RNG stream derived from ``seed``:

    1. hold out ``val_holdout`` random samples as the server's validation set;
    2. if ``train_count`` > 0, keep that many random training samples (original order);
    3. partition the rest among ``party-0 .. party-{n-1}`` by ``partition_spec``;
    4. apply each party's data attack with an RNG derived from (seed, party index).

    Args:
        data_spec: Data set spec for :func:`load_dataset`, e.g. ``mnist:DIR``.
        n_parties: Number of parties.
        partition_spec: ``iid``, ``dirichlet:ALPHA``, ``quantity:ALPHA``, ``shards:K``.
        val_holdout: Validation samples to hold out (>= 1).
        attacks: Attacks keyed by party index (``"3"``) or id (``"party-3"``); update
            attacks are left for training (:func:`fedgrpc.runtime.train_round`).
        seed: Run seed.
        train_count: Training samples to keep; 0 keeps all.

    Returns:
        ``(parties, val)``: party id -> data set (in id order), and the validation set.

    Raises:
        ConfigError: bad sizes or specs, or an attack for an unknown party.
    """
    if n_parties < 1:
        raise ConfigError(f"need at least one party, got {n_parties}")
    if val_holdout < 1:
        raise ConfigError(f"val_holdout must be >= 1, got {val_holdout}")
    if train_count < 0:
        raise ConfigError(f"train_count must be >= 0, got {train_count}")
    ids = party_ids(n_parties)
    by_party = resolve_attacks(attacks, ids)
    data = load_dataset(data_spec)
    if val_holdout >= len(data):
        raise ConfigError(
            f"val_holdout {val_holdout} leaves no training data: {data.name!r} has "
            f"{len(data)} samples"
        )
    train, val = split_holdout(data, val_holdout, _stream(seed, _STREAM_HOLDOUT))
    if train_count:
        if train_count > len(train):
            raise ConfigError(
                f"train_count {train_count} exceeds the {len(train)} samples left "
                f"after holding out {val_holdout} of {data.name!r}"
            )
        keep = _stream(seed, _STREAM_TRAIN_COUNT).choice(
            len(train), size=train_count, replace=False
        )
        train = subset(train, np.sort(keep))
    parts = partition.partition(
        partition_spec, train.y, n_parties, _stream(seed, _STREAM_PARTITION)
    )
    parties: dict[str, Dataset] = {}
    for index, (pid, idx) in enumerate(zip(ids, parts, strict=True)):
        ds = subset(train, idx)
        attack = by_party.get(pid)
        if attack is not None and attack.on_data:
            x, y = apply_data_attack(
                attack, ds.x, ds.y, ds.num_classes, _stream(seed, _STREAM_ATTACK, index)
            )
            ds = Dataset(x=x, y=y, num_classes=ds.num_classes, name=ds.name)
        parties[pid] = ds
    log.info(
        "%s: %d validation samples, %d parties (%s) with %s samples",
        data.name,
        len(val),
        n_parties,
        partition_spec,
        [len(d) for d in parties.values()],
    )
    return parties, val


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


# ------------------------------------------------------------------------------------
# Coalition utility


@dataclass(frozen=True)
class CoalitionValue:
    """One trained coalition: its utilities and the wall time of its training."""

    loss_drop: float  # L_v(θ_0) - L_v(θ_T^S)
    acc_gain: float  # acc_v(θ_T^S) - acc_v(θ_0)
    seconds: float


class CoalitionUtility:
    """v(S) by training coalition S in process; cached per coalition.

    Calling it with a coalition returns ``(loss drop, accuracy gain)``; the empty
    coalition is ``(0, 0)`` (θ_0 itself).
    """

    def __init__(
        self,
        cfg: RoundConfig,
        parties: Mapping[str, Dataset],
        val: Dataset,
        attacks: Mapping[str, Attack],
        theta0: np.ndarray,
        *,
        threads: int = 1,
        on_train: Callable[[frozenset[str], CoalitionValue], None] | None = None,
    ) -> None:
        if not parties:
            raise ConfigError("no parties to form coalitions of")
        self._cfg = cfg
        self._parties = dict(parties)
        self._val = val
        self._attacks = resolve_attacks(attacks, list(parties))
        self.theta0 = theta0
        self._threads = threads
        self.on_train = on_train
        self.values: dict[frozenset[str], CoalitionValue] = {}
        setup = setup_model(cfg)
        self.base_loss, self.base_acc = Evaluator(setup.model, val.x, val.y).evaluate(
            setup.layout.views(theta0)
        )

    def __call__(self, coalition: frozenset[str]) -> tuple[float, float]:
        """``(L_v(θ_0) - L_v(θ_T^S), acc(θ_T^S) - acc(θ_0))`` for coalition ``S``."""
        if not coalition:
            return 0.0, 0.0
        value = self.values.get(coalition)
        if value is None:
            unknown = sorted(coalition - self._parties.keys())
            if unknown:
                raise ValueError(f"coalition names unknown parties {unknown}")
            t0 = time.perf_counter()
            results = self.train(coalition)
            value = self.value_of(results, time.perf_counter() - t0)
            self.record(coalition, value)
        return value.loss_drop, value.acc_gain

    def train(self, coalition: frozenset[str]) -> list[RoundResult]:
        """Run the engine on exactly the parties of ``coalition``; its round results."""
        members = {p: self._parties[p] for p in sorted(coalition)}
        cfg = replace(
            self._cfg, min_parties=len(members), expected_parties=len(members)
        )
        _, results = run_in_process(
            cfg,
            members,
            self._val,
            attacks=self._attacks,
            theta0=self.theta0,
            threads=self._threads,
        )
        return results

    def value_of(
        self, results: Sequence[RoundResult], seconds: float
    ) -> CoalitionValue:
        """The utilities of a finished run from its last round."""
        last = results[-1]
        return CoalitionValue(
            loss_drop=self.base_loss - last.val_loss_after,
            acc_gain=last.val_acc_after - self.base_acc,
            seconds=seconds,
        )

    def record(self, coalition: frozenset[str], value: CoalitionValue) -> None:
        """Cache a coalition's value (e.g. the full run done elsewhere)."""
        self.values[coalition] = value
        if self.on_train is not None:
            self.on_train(coalition, value)

    def loss(self, coalition: frozenset[str]) -> float:
        """The loss-drop utility alone (a :data:`contribution.Utility`)."""
        return self(coalition)[0]

    def accuracy(self, coalition: frozenset[str]) -> float:
        """The accuracy-gain utility alone (a :data:`contribution.Utility`)."""
        return self(coalition)[1]


def coalition_utility(
    cfg: RoundConfig,
    parties: Mapping[str, Dataset],
    val: Dataset,
    attacks: Mapping[str, Attack],
    theta0: np.ndarray | None = None,
    *,
    threads: int = 1,
) -> CoalitionUtility:
    """A cached ``S -> (val-loss drop, accuracy gain)`` that trains S in process.

    Each coalition runs ``cfg`` unchanged except ``min_parties = expected_parties =
    |S|``: same seed (so each party draws the same mini-batches), same θ_0 (``theta0``,
    default the seeded initialisation of ``cfg``), same data per party. Aggregation
    weights are renormalised over S (p_i = n_i / Σ_{j∈S} n_j).
    """
    cfg = config_for_data(cfg, val)
    start = setup_model(cfg).theta0 if theta0 is None else theta0
    return CoalitionUtility(cfg, parties, val, attacks, start, threads=threads)


# ------------------------------------------------------------------------------------
# The comparison


@dataclass
class ShapleyReport:
    """Exact (or sampled) Shapley values against DIG-FL and leave-one-out."""

    parties: list[str]
    attacks: dict[str, str]  # party -> attack spec ("" = honest)
    samples: dict[str, int]
    method: str  # "exact" or "permutation"
    permutations: int  # 0 for exact
    shapley: dict[str, float]  # on the loss drop
    shapley_acc: dict[str, float]  # on the accuracy gain
    digfl: dict[str, float]  # Σ_t φ_{t,i} from the full run
    loo: dict[str, float]  # v(N) - v(N - {i}), loss drop
    loo_acc: dict[str, float]
    grand_loss_drop: float  # v(N)
    grand_acc_gain: float
    val_loss0: float  # L_v(θ_0)
    val_acc0: float
    final_val_loss: float  # L_v(θ_T^N)
    final_val_acc: float
    pearson: float  # DIG-FL vs Shapley (loss)
    spearman: float
    loo_pearson: float  # LOO vs Shapley (loss), for comparison
    loo_spearman: float
    digfl_run_s: float  # wall time of the full training run that yields DIG-FL
    digfl_scoring_s: float  # of which DIG-FL scoring: R x (v_t pass + n inner products)
    shapley_s: float  # wall time of the Shapley computation (all its trainings)
    loo_s: float  # training time of the n + 1 coalitions LOO needs
    digfl_run_cpu_s: float  # CPU time of the same (robust when the host is shared)
    shapley_cpu_s: float
    coalitions_trained: int
    rounds: int
    config: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] = field(
        default_factory=dict
    )  # data spec etc., for the record
    coalitions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def time_ratio(self) -> float:
        """Shapley wall time over the DIG-FL run's wall time."""
        return _ratio(self.shapley_s, self.digfl_run_s)

    @property
    def scoring_ratio(self) -> float:
        """Shapley wall time over DIG-FL's scoring overhead alone."""
        return _ratio(self.shapley_s, self.digfl_scoring_s)

    @property
    def cpu_ratio(self) -> float:
        """Shapley CPU time over the DIG-FL run's CPU time."""
        return _ratio(self.shapley_cpu_s, self.digfl_run_cpu_s)

    def ranks(self, values: Mapping[str, float]) -> dict[str, int]:
        """Rank 1 = largest value; ties keep party order."""
        order = sorted(self.parties, key=lambda p: -values[p])
        return {p: i + 1 for i, p in enumerate(order)}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; NaN becomes null."""
        rs, rd, rl = (
            self.ranks(self.shapley),
            self.ranks(self.digfl),
            self.ranks(self.loo),
        )
        doc: dict[str, Any] = {
            "method": self.method,
            "permutations": self.permutations,
            "rounds": self.rounds,
            "coalitions_trained": self.coalitions_trained,
            "parties": [
                {
                    "party_id": p,
                    "attack": self.attacks.get(p, ""),
                    "samples": self.samples[p],
                    "shapley": self.shapley[p],
                    "shapley_acc": self.shapley_acc[p],
                    "digfl": self.digfl[p],
                    "loo": self.loo[p],
                    "loo_acc": self.loo_acc[p],
                    "rank_shapley": rs[p],
                    "rank_digfl": rd[p],
                    "rank_loo": rl[p],
                }
                for p in self.parties
            ],
            "grand": {
                "loss_drop": self.grand_loss_drop,
                "acc_gain": self.grand_acc_gain,
                "shapley_sum": sum(self.shapley.values()),
                "digfl_sum": sum(self.digfl.values()),
                "val_loss0": self.val_loss0,
                "val_acc0": self.val_acc0,
                "final_val_loss": self.final_val_loss,
                "final_val_acc": self.final_val_acc,
            },
            "correlation": {
                "pearson": self.pearson,
                "spearman": self.spearman,
                "loo_pearson": self.loo_pearson,
                "loo_spearman": self.loo_spearman,
            },
            "timing": {
                "digfl_run_s": self.digfl_run_s,
                "digfl_scoring_s": self.digfl_scoring_s,
                "shapley_s": self.shapley_s,
                "loo_s": self.loo_s,
                "ratio": self.time_ratio,
                "ratio_scoring": self.scoring_ratio,
                "digfl_run_cpu_s": self.digfl_run_cpu_s,
                "shapley_cpu_s": self.shapley_cpu_s,
                "cpu_ratio": self.cpu_ratio,
            },
            "config": self.config,
            "setup": self.setup,
            "coalitions": self.coalitions,
        }
        return _finite_or_none(doc)  # type: ignore[no-any-return]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _finite_or_none(obj: Any) -> Any:
    """Replace NaN/inf floats by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj


def _correlations(
    a: Mapping[str, float], b: Mapping[str, float], order: Sequence[str]
) -> tuple[float, float]:
    """Pearson and Spearman of two per-party maps; NaN when undefined (n < 2)."""
    xs = [a[p] for p in order]
    ys = [b[p] for p in order]
    if len(order) < 2 or not all(math.isfinite(v) for v in xs + ys):
        return math.nan, math.nan
    return contribution.pearson(xs, ys), contribution.spearman(xs, ys)


def _scoring_seconds(
    cfg: RoundConfig, val: Dataset, theta0: np.ndarray, n_parties: int, threads: int
) -> float:
    """DIG-FL's own cost in a run: R x (one v_t pass + n inner products), measured.

    The in-process engine computes v_t inline, so the run's ``val_grad_s`` is not its
    cost; time the same validator call at θ_0 instead (best of three).
    """
    torch.set_num_threads(threads)
    setup = setup_model(cfg)
    validator = FlatValidator(Evaluator(setup.model, val.x, val.y), setup.layout)
    u = np.ones_like(theta0)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        v, _, _ = validator.gradient(theta0)
        for _ in range(n_parties):
            float(np.dot(v, u))
        best = min(best, time.perf_counter() - t0)
    return cfg.rounds * best


def evaluate(
    cfg: RoundConfig,
    parties: Mapping[str, Dataset],
    val: Dataset,
    attacks: Mapping[str, Attack],
    *,
    method: Method = "auto",
    permutations: int = 200,
    rng_seed: int | None = None,
    progress: ProgressFn | None = None,
    threads: int = 1,
    theta0: np.ndarray | None = None,
) -> ShapleyReport:
    """Train the full federation once (DIG-FL) and every coalition (Shapley); compare.

    Args:
        cfg: Round configuration (input shape and classes are taken from ``val``).
        parties: Party id -> local data (already attacked, see :func:`prepare_parties`).
        val: The server's validation set.
        attacks: Attacks by party id or index; data attacks are assumed applied, update
            attacks are applied in every training.
        method: ``exact`` (2^n - 1 trainings), ``permutation`` (Monte Carlo over
            ``permutations`` random orders) or ``auto`` (exact up to
            AUTO_EXACT_MAX_PARTIES parties).
        permutations: Orders to sample for ``permutation``.
        rng_seed: Seed of the permutation draws (default ``cfg.seed``).
        progress: Called as ``progress(done, total)`` after each trained coalition.
        threads: torch intra-op threads per training.
        theta0: Initial model (default: the seeded initialisation of ``cfg``).

    Raises:
        ConfigError: unknown method, too few parties, or a failed training run.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    ids = list(parties)
    n = len(ids)
    if n < 1:
        raise ConfigError("need at least one party")
    chosen = method
    if method == "auto":
        chosen = "exact" if n <= AUTO_EXACT_MAX_PARTIES else "permutation"
    if chosen == "exact" and n > contribution.MAX_EXACT_PLAYERS:
        raise ConfigError(
            f"exact Shapley over {n} parties needs 2^{n} - 1 trainings; use "
            "--method permutation"
        )
    if chosen == "permutation" and permutations < 1:
        raise ConfigError(f"permutations must be >= 1, got {permutations}")
    cfg = config_for_data(cfg, val)
    utility = coalition_utility(cfg, parties, val, attacks, theta0, threads=threads)
    total = 2**n - 1 if chosen == "exact" else min(2**n - 1, permutations * n)

    shown = [0, 0]  # the last (done, total) drawn

    def show(done: int, of: int) -> None:
        if progress is not None and [done, of] != shown:
            shown[:] = [done, of]
            progress(done, of)

    def on_train(_s: frozenset[str], _v: CoalitionValue) -> None:
        show(len(utility.values), total)

    utility.on_train = on_train

    # The full run: DIG-FL's scores, and v(N) for Shapley (the same training).
    everyone = frozenset(ids)
    t0, c0 = time.perf_counter(), time.process_time()
    results = utility.train(everyone)
    digfl_run_s = time.perf_counter() - t0
    digfl_run_cpu_s = time.process_time() - c0
    grand = utility.value_of(results, digfl_run_s)
    per_round = [{p.party_id: p.score for p in r.parties} for r in results]
    totals = contribution.totals(per_round)
    digfl = {p: totals.get(p, 0.0) for p in ids}
    utility.record(everyone, grand)

    t1, c1 = time.perf_counter(), time.process_time()
    if chosen == "exact":
        shapley = contribution.exact_shapley(ids, utility.loss)
        shapley_acc = contribution.exact_shapley(ids, utility.accuracy)
    else:
        seed = cfg.seed if rng_seed is None else rng_seed
        # Same seed twice: the same orders, so the accuracy pass trains nothing new.
        shapley = contribution.permutation_shapley(
            ids, utility.loss, permutations, np.random.default_rng(seed)
        )
        shapley_acc = contribution.permutation_shapley(
            ids, utility.accuracy, permutations, np.random.default_rng(seed)
        )
    shapley_s = digfl_run_s + (time.perf_counter() - t1)
    shapley_cpu_s = digfl_run_cpu_s + (time.process_time() - c1)
    loo = contribution.leave_one_out(ids, utility.loss)
    loo_acc = contribution.leave_one_out(ids, utility.accuracy)
    # What LOO alone would cost: the full run and the n runs without one party.
    loo_s = digfl_run_s + sum(
        utility.values[everyone - {p}].seconds for p in ids if len(everyone) > 1
    )
    show(len(utility.values), len(utility.values))

    pr, sp = _correlations(digfl, shapley, ids)
    lpr, lsp = _correlations(loo, shapley, ids)
    resolved = resolve_attacks(attacks, ids)
    config = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
    }
    config["update_kind"] = str(cfg.update_kind)
    return ShapleyReport(
        parties=ids,
        attacks={p: resolved[p].spec if p in resolved else "" for p in ids},
        samples={p: len(parties[p]) for p in ids},
        method=chosen,
        permutations=permutations if chosen == "permutation" else 0,
        shapley=shapley,
        shapley_acc=shapley_acc,
        digfl=digfl,
        loo=loo,
        loo_acc=loo_acc,
        grand_loss_drop=grand.loss_drop,
        grand_acc_gain=grand.acc_gain,
        val_loss0=utility.base_loss,
        val_acc0=utility.base_acc,
        final_val_loss=results[-1].val_loss_after,
        final_val_acc=results[-1].val_acc_after,
        pearson=pr,
        spearman=sp,
        loo_pearson=lpr,
        loo_spearman=lsp,
        digfl_run_s=digfl_run_s,
        digfl_scoring_s=_scoring_seconds(cfg, val, utility.theta0, n, threads),
        shapley_s=shapley_s,
        loo_s=loo_s,
        digfl_run_cpu_s=digfl_run_cpu_s,
        shapley_cpu_s=shapley_cpu_s,
        coalitions_trained=len(utility.values),
        rounds=cfg.rounds,
        config=config,
        coalitions=[
            {
                "parties": sorted(s),
                "loss_drop": v.loss_drop,
                "acc_gain": v.acc_gain,
                "seconds": v.seconds,
            }
            for s, v in sorted(
                utility.values.items(), key=lambda kv: (len(kv[0]), sorted(kv[0]))
            )
        ],
    )


# ------------------------------------------------------------------------------------
# Output


def format_table(report: ShapleyReport) -> str:
    """An aligned text table per party, then correlations and timings."""
    rs, rd, rl = (
        report.ranks(report.shapley),
        report.ranks(report.digfl),
        report.ranks(report.loo),
    )
    label = "exact" if report.method == "exact" else f"MC/{report.permutations}"
    header = [
        "party",
        "attack",
        "samples",
        f"shapley({label})",
        "shapley(acc)",
        "dig-fl",
        "loo",
        "rank S",
        "rank D",
        "rank L",
    ]
    rows = [
        [
            p,
            report.attacks.get(p) or "-",
            str(report.samples[p]),
            f"{report.shapley[p]:+.5f}",
            f"{report.shapley_acc[p]:+.4f}",
            f"{report.digfl[p]:+.5f}",
            f"{report.loo[p]:+.5f}",
            str(rs[p]),
            str(rd[p]),
            str(rl[p]),
        ]
        for p in report.parties
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0, 1}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    n = len(report.parties)
    what = (
        f"exact, {2**n - 1} coalitions"
        if report.method == "exact"
        else f"{report.permutations} permutations, "
        f"{report.coalitions_trained} coalitions"
    )
    out += [
        "",
        f"Shapley ({what} x {report.rounds} rounds): sum "
        f"{sum(report.shapley.values()):+.5f}"
        f" = v(N) {report.grand_loss_drop:+.5f}; DIG-FL sum "
        f"{sum(report.digfl.values()):+.5f}",
        f"DIG-FL vs Shapley: Pearson {_fmt(report.pearson)}, Spearman "
        f"{_fmt(report.spearman)}   (LOO vs Shapley: Pearson "
        f"{_fmt(report.loo_pearson)}, "
        f"Spearman {_fmt(report.loo_spearman)})",
        f"validation (all parties): loss {report.val_loss0:.4f} -> "
        f"{report.final_val_loss:.4f}, accuracy {report.val_acc0:.4f} -> "
        f"{report.final_val_acc:.4f}",
        f"time: DIG-FL run {report.digfl_run_s:.2f} s (scoring "
        f"{report.digfl_scoring_s:.3f} s), Shapley {report.shapley_s:.2f} s, "
        f"LOO {report.loo_s:.2f} s; "
        f"Shapley/DIG-FL {_fmt(report.time_ratio, '.1f')}x "
        f"({_fmt(report.scoring_ratio, '.0f')}x the scoring alone)",
        f"CPU time: DIG-FL run {report.digfl_run_cpu_s:.2f} s, Shapley "
        f"{report.shapley_cpu_s:.2f} s; Shapley/DIG-FL "
        f"{_fmt(report.cpu_ratio, '.1f')}x",
    ]
    return "\n".join(out)


def _fmt(x: float, spec: str = ".4f") -> str:
    return "n/a" if not math.isfinite(x) else format(x, spec)


def progress_bar(
    done: int,
    total: int,
    *,
    stream: TextIO | None = None,
    force: bool = False,
    width: int = 30,
    unit: str = "coalitions",
) -> None:
    """Draw ``[#####.....] 12/63 coalitions`` over the line on ``stream`` (stderr).

    Draws only when the stream is a TTY, unless ``force``; ends the line at
    ``done >= total``.
    """
    out = sys.stderr if stream is None else stream
    if not force and not (hasattr(out, "isatty") and out.isatty()):
        return
    frac = 1.0 if total <= 0 else min(1.0, done / total)
    filled = round(frac * width)
    out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit}")
    if done >= total:
        out.write("\n")
    out.flush()


__all__ = [
    "AUTO_EXACT_MAX_PARTIES",
    "METHODS",
    "CoalitionUtility",
    "CoalitionValue",
    "ShapleyReport",
    "coalition_utility",
    "evaluate",
    "format_table",
    "party_ids",
    "prepare_parties",
    "progress_bar",
    "resolve_attacks",
]
