"""Ground truth for DIG-FL: Shapley values by retraining every coalition (DESIGN §4).

Every coalition S of the parties is trained with the same in-process engine
(:func:`fedgrpc.learning.inprocess.run_in_process`, no network), the same data per
party, the same seed and the same initial model θ_0. Its utility is the validation-loss
drop v(S) = L_v(θ_0) - L_v(θ_T^S) (and, second, the accuracy gain). Exact Shapley
weights, no clipping. DIG-FL's estimate comes for free from one run of the full
federation; the ratio of the two wall times is the point of the comparison.

No grpc here: the ``shapley`` command is a thin layer over :func:`evaluate`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from fedgrpc.config import SHAPLEY_METHODS, RoundConfig
from fedgrpc.datasets.attacks import Attack
from fedgrpc.datasets.sources import Dataset
from fedgrpc.datasets.split import resolve_attacks
from fedgrpc.errors import ConfigError
from fedgrpc.learning.inprocess import run_in_process
from fedgrpc.learning.training import Evaluator
from fedgrpc.learning.validation import FlatValidator, config_for_data, setup_model
from fedgrpc.scoring import digfl as dg
from fedgrpc.scoring import shapley as sh
from fedgrpc.types import RoundResult

log = logging.getLogger(__name__)

Method = Literal["auto", "exact", "permutation"]

AUTO_EXACT_MAX_PARTIES = 10
"""``method="auto"`` enumerates all 2^n - 1 coalitions up to this many parties."""

ProgressFn = Callable[[int, int], None]


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
        try:
            self.base_loss, self.base_acc = Evaluator(
                setup.model, val.x, val.y
            ).evaluate(setup.layout.views(theta0))
        except RuntimeError as err:  # torch: the model cannot take these samples
            raise ConfigError(
                f"model {cfg.model!r} does not fit the data (inputs "
                f"{list(cfg.input_shape)}, {cfg.num_classes} classes): {err}"
            ) from None

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
        # Every member takes part (client sampling: the round's sample of them).
        quorum = replace(self._cfg, min_parties=1).asked_per_round(len(members))
        cfg = replace(self._cfg, min_parties=quorum, expected_parties=len(members))
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
        """The loss-drop utility alone (a shapley ``Utility``)."""
        return self(coalition)[0]

    def accuracy(self, coalition: frozenset[str]) -> float:
        """The accuracy-gain utility alone (a shapley ``Utility``)."""
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
    digfl2: dict[str, float]  # Σ_t φ2_{t,i} (digfl-2, trapezoid) from the same run
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
    pearson2: float  # digfl-2 vs Shapley (loss)
    spearman2: float
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
                    "digfl2": self.digfl2[p],
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
                "digfl2_sum": sum(self.digfl2.values()),
                "val_loss0": self.val_loss0,
                "val_acc0": self.val_acc0,
                "final_val_loss": self.final_val_loss,
                "final_val_acc": self.final_val_acc,
            },
            "correlation": {
                "pearson": self.pearson,
                "spearman": self.spearman,
                "pearson_digfl2": self.pearson2,
                "spearman_digfl2": self.spearman2,
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
    return sh.pearson(xs, ys), sh.spearman(xs, ys)


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
    ids = list(parties)
    n = len(ids)
    chosen = _choose_method(method, n, permutations)
    cfg = config_for_data(cfg, val)
    utility = coalition_utility(cfg, parties, val, attacks, theta0, threads=threads)
    total = 2**n - 1 if chosen == "exact" else min(2**n - 1, permutations * n)
    show = _progress_hook(utility, progress, total)
    full = _full_run(utility, ids)
    values = _shapley_pass(
        utility,
        ids,
        full,
        method=chosen,
        permutations=permutations,
        seed=cfg.seed if rng_seed is None else rng_seed,
    )
    show(len(utility.values), len(utility.values))
    return _report(
        cfg,
        parties,
        val,
        attacks,
        utility,
        full,
        values,
        method=chosen,
        permutations=permutations,
        threads=threads,
    )


def _choose_method(method: str, n: int, permutations: int) -> str:
    """Resolve ``auto`` and check the method fits ``n`` parties.

    Raises:
        ConfigError: unknown method, no parties, too many for exact, or no
            permutations to sample.
    """
    if method not in SHAPLEY_METHODS:
        raise ConfigError(f"method must be one of {SHAPLEY_METHODS}, got {method!r}")
    if n < 1:
        raise ConfigError("need at least one party")
    chosen = method
    if method == "auto":
        chosen = "exact" if n <= AUTO_EXACT_MAX_PARTIES else "permutation"
    if chosen == "exact" and n > sh.MAX_EXACT_PLAYERS:
        raise ConfigError(
            f"exact Shapley over {n} parties needs 2^{n} - 1 trainings; use "
            "--method permutation"
        )
    if chosen == "permutation" and permutations < 1:
        raise ConfigError(f"permutations must be >= 1, got {permutations}")
    return chosen


def _progress_hook(
    utility: CoalitionUtility, progress: ProgressFn | None, total: int
) -> ProgressFn:
    """Report ``(trained, total)`` after each coalition ``utility`` trains.

    Returns the reporter itself, for the final call; it skips a pair equal to the
    last one it reported, so ``progress`` sees each step once.
    """
    shown = [0, 0]  # the last (done, total) drawn

    def show(done: int, of: int) -> None:
        if progress is not None and [done, of] != shown:
            shown[:] = [done, of]
            progress(done, of)

    def on_train(_s: frozenset[str], _v: CoalitionValue) -> None:
        show(len(utility.values), total)

    utility.on_train = on_train
    return show


@dataclass(frozen=True)
class _FullRun:
    """The training of the whole federation: DIG-FL's scores and v(N) in one."""

    results: list[RoundResult]
    grand: CoalitionValue
    digfl: dict[str, float]  # Σ_t φ_{t,i}
    digfl2: dict[str, float]  # Σ_t φ2_{t,i}
    wall_s: float
    cpu_s: float


def _full_run(utility: CoalitionUtility, ids: Sequence[str]) -> _FullRun:
    """Train all of ``ids`` once, timed, and cache it as v(N) for Shapley."""
    everyone = frozenset(ids)
    t0, c0 = time.perf_counter(), time.process_time()
    results = utility.train(everyone)
    wall_s = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    grand = utility.value_of(results, wall_s)
    out = []
    for method in ("digfl-1", "digfl-2"):
        per_round = [r.scores(method) for r in results]  # momentum carry included
        totals = dg.totals(per_round)
        out.append({p: totals.get(p, 0.0) for p in ids})
    utility.record(everyone, grand)
    return _FullRun(results, grand, out[0], out[1], wall_s, cpu_s)


@dataclass(frozen=True)
class _ShapleyPass:
    """Shapley and leave-one-out values with what they cost to compute."""

    shapley: dict[str, float]
    shapley_acc: dict[str, float]
    loo: dict[str, float]
    loo_acc: dict[str, float]
    shapley_s: float  # including the full run
    shapley_cpu_s: float
    loo_s: float


def _shapley_pass(
    utility: CoalitionUtility,
    ids: Sequence[str],
    full: _FullRun,
    *,
    method: str,
    permutations: int,
    seed: int,
) -> _ShapleyPass:
    """Shapley values by ``method`` (training what the full run did not), then LOO."""
    t1, c1 = time.perf_counter(), time.process_time()
    if method == "exact":
        shapley = sh.exact_shapley(ids, utility.loss)
        shapley_acc = sh.exact_shapley(ids, utility.accuracy)
    else:
        # Same seed twice: the same orders, so the accuracy pass trains nothing new.
        shapley = sh.permutation_shapley(
            ids, utility.loss, permutations, np.random.default_rng(seed)
        )
        shapley_acc = sh.permutation_shapley(
            ids, utility.accuracy, permutations, np.random.default_rng(seed)
        )
    shapley_s = full.wall_s + (time.perf_counter() - t1)
    shapley_cpu_s = full.cpu_s + (time.process_time() - c1)
    loo = sh.leave_one_out(ids, utility.loss)
    loo_acc = sh.leave_one_out(ids, utility.accuracy)
    # What LOO alone would cost: the full run and the n runs without one party.
    everyone = frozenset(ids)
    loo_s = full.wall_s + sum(
        utility.values[everyone - {p}].seconds for p in ids if len(everyone) > 1
    )
    return _ShapleyPass(
        shapley, shapley_acc, loo, loo_acc, shapley_s, shapley_cpu_s, loo_s
    )


def _report(
    cfg: RoundConfig,
    parties: Mapping[str, Dataset],
    val: Dataset,
    attacks: Mapping[str, Attack],
    utility: CoalitionUtility,
    full: _FullRun,
    values: _ShapleyPass,
    *,
    method: str,
    permutations: int,
    threads: int,
) -> ShapleyReport:
    """Assemble the report, timing DIG-FL's scoring overhead on the way."""
    ids = list(parties)
    pr, sp = _correlations(full.digfl, values.shapley, ids)
    pr2, sp2 = _correlations(full.digfl2, values.shapley, ids)
    lpr, lsp = _correlations(values.loo, values.shapley, ids)
    resolved = resolve_attacks(attacks, ids)
    return ShapleyReport(
        parties=ids,
        attacks={p: resolved[p].spec if p in resolved else "" for p in ids},
        samples={p: len(parties[p]) for p in ids},
        method=method,
        permutations=permutations if method == "permutation" else 0,
        shapley=values.shapley,
        shapley_acc=values.shapley_acc,
        digfl=full.digfl,
        digfl2=full.digfl2,
        loo=values.loo,
        loo_acc=values.loo_acc,
        grand_loss_drop=full.grand.loss_drop,
        grand_acc_gain=full.grand.acc_gain,
        val_loss0=utility.base_loss,
        val_acc0=utility.base_acc,
        final_val_loss=full.results[-1].val_loss_after,
        final_val_acc=full.results[-1].val_acc_after,
        pearson=pr,
        spearman=sp,
        pearson2=pr2,
        spearman2=sp2,
        loo_pearson=lpr,
        loo_spearman=lsp,
        digfl_run_s=full.wall_s,
        digfl_scoring_s=_scoring_seconds(cfg, val, utility.theta0, len(ids), threads),
        shapley_s=values.shapley_s,
        loo_s=values.loo_s,
        digfl_run_cpu_s=full.cpu_s,
        shapley_cpu_s=values.shapley_cpu_s,
        coalitions_trained=len(utility.values),
        rounds=cfg.rounds,
        config=_config_json(cfg),
        coalitions=_coalitions_json(utility.values),
    )


def _config_json(cfg: RoundConfig) -> dict[str, Any]:
    """``cfg`` as a JSON-ready dict (tuples as lists, the update kind as a string)."""
    config = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
    }
    config["update_kind"] = str(cfg.update_kind)
    return config


def _coalitions_json(
    values: Mapping[frozenset[str], CoalitionValue],
) -> list[dict[str, Any]]:
    """Every trained coalition, smallest first, then by its sorted members."""
    return [
        {
            "parties": sorted(s),
            "loss_drop": v.loss_drop,
            "acc_gain": v.acc_gain,
            "seconds": v.seconds,
        }
        for s, v in sorted(values.items(), key=lambda kv: (len(kv[0]), sorted(kv[0])))
    ]


__all__ = [
    "AUTO_EXACT_MAX_PARTIES",
    "CoalitionUtility",
    "CoalitionValue",
    "ShapleyReport",
    "coalition_utility",
    "evaluate",
]
