"""digfl-2: trapezoid scores one round late, the spill, and the ledger's schema 2."""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedgrpc.config import RoundConfig
from fedgrpc.engine import RoundEngine
from fedgrpc.engine import spill as spill_module
from fedgrpc.engine.second_order import PendingSecond
from fedgrpc.engine.spill import DirSpill, MemorySpill, Spill, blocked_dot
from fedgrpc.errors import ConfigError, ErrorCode, FedGrpcError
from fedgrpc.layout import update_digest
from fedgrpc.store.ledger import LEDGER_FILE, SCHEMA_VERSION, Ledger
from fedgrpc.types import (
    PartyRound,
    RoundOutcome,
    RoundResult,
    RunState,
    SecondOrder,
    TensorSpec,
    UpdateKind,
)

SPECS = (TensorSpec("w", "float32", (2, 3)), TensorSpec("b", "float32", (3,)))
SIZE = 9
LR = 0.5


def _spd(seed: int) -> np.ndarray:
    m = np.random.default_rng(seed).standard_normal((SIZE, SIZE))
    a: np.ndarray = m @ m.T / SIZE + 0.5 * np.eye(SIZE)
    return a


class ExactQuadratic:
    """L(theta) = 0.5 theta^T A theta - b^T theta, gradient A theta - b (float64)."""

    def __init__(self, seed: int = 0) -> None:
        self.a = _spd(seed)
        self.b = np.random.default_rng(seed + 1).standard_normal(SIZE)
        self.gradient_at: list[np.ndarray] = []

    def loss(self, flat: np.ndarray) -> float:
        x = flat.astype(np.float64)
        return float(0.5 * x @ self.a @ x - self.b @ x)

    def grad(self, flat: np.ndarray) -> np.ndarray:
        g: np.ndarray = self.a @ flat.astype(np.float64) - self.b
        return g

    def gradient(self, flat: np.ndarray) -> tuple[np.ndarray, float, float]:
        self.gradient_at.append(flat.copy())
        loss = self.loss(flat)
        return self.grad(flat), loss, -loss

    def evaluate(self, flat: np.ndarray) -> tuple[float, float]:
        loss = self.loss(flat)
        return loss, -loss


class FakeClock:
    def __call__(self) -> float:
        return 1000.0


@dataclass
class Run:
    engine: RoundEngine
    validator: ExactQuadratic
    events: list[tuple[str, int]] = field(default_factory=list)
    results: list[RoundResult] = field(default_factory=list)
    thetas: list[np.ndarray] = field(default_factory=list)
    second: dict[int, SecondOrder] = field(default_factory=dict)


def _run(
    *,
    executor: futures.Executor | None = None,
    ledger: Ledger | None = None,
    spill: Spill | None = None,
    second_executor: futures.Executor | None = None,
    **cfg: Any,
) -> Run:
    kw: dict[str, Any] = {
        "rounds": 3,
        "min_parties": 3,
        "server_lr": LR,
        "round_timeout_s": 10.0,
        "join_timeout_s": 5.0,
    }
    kw.update(cfg)
    validator = ExactQuadratic()
    run = Run(engine=None, validator=validator)  # type: ignore[arg-type]

    def commit(result: RoundResult, theta: np.ndarray) -> None:
        run.events.append(("commit", result.round))
        run.results.append(result)
        run.thetas.append(theta.copy())
        if ledger is not None:
            ledger.record_round(result)

    def second_order(so: SecondOrder) -> None:
        run.events.append(("second", so.round))
        run.second[so.round] = so
        if ledger is not None:
            ledger.record_second_order(so)

    def finish(state: RunState, reason: str) -> None:
        run.events.append(("finish", 0))

    run.engine = RoundEngine(
        RoundConfig(**kw),
        SPECS,
        np.zeros(SIZE, dtype=np.float32),
        validator,
        executor=executor,
        on_commit=commit,
        on_second_order=second_order,
        on_finish=finish,
        clock=FakeClock(),
        max_in_flight=4,
        spill=spill,
        second_order_executor=second_executor,
    )
    for p in N:
        run.engine.join(p, N[p])
        if ledger is not None:
            ledger.upsert_party(p, N[p])
    run.engine.tick()
    assert run.engine.state == RunState.TRAINING
    return run


N = {"a": 1, "b": 3, "c": 4}


def _submit(engine: RoundEngine, party: str, rnd: int, u: np.ndarray) -> None:
    flat = np.asarray(u, dtype=np.float32)
    sub = engine.begin_submission(party, rnd, N[party], slot_timeout_s=1.0)
    try:
        for i, off in enumerate(engine.layout.offsets):
            sub.add(i, 0, flat[off : off + engine.layout.specs[i].numel])
        assert sub.finish(update_digest(flat)).accepted
    except BaseException:
        sub.abort()
        raise


def _updates(run: Run, t: int, kind: UpdateKind) -> dict[str, np.ndarray]:
    """Each party's update at theta_t: its own noisy gradient (or a local step)."""
    theta = run.engine.theta
    g = run.validator.grad(theta)
    rng = np.random.default_rng(100 + t)
    out = {}
    for i, p in enumerate(N):
        u = g + 0.5 * rng.standard_normal(SIZE)
        if p == "c" and t == 1:
            u = 40 * u  # bounded by the auto norm bound: c_i < 1 in the trapezoid
        if kind is UpdateKind.DELTA:
            u = -0.3 * u  # a local step: theta_i - theta_t
        out[p] = (u * (1 + 0.1 * i)).astype(np.float32)
    return out


def _drive(run: Run, kind: UpdateKind) -> list[dict[str, np.ndarray]]:
    """Every round to the end; returns each round's updates."""
    sent = []
    while not run.engine.finished:
        t = run.engine.open_round
        updates = _updates(run, t, kind)
        for p, u in updates.items():
            _submit(run.engine, p, t, u)
        run.engine.tick()
        sent.append(updates)
    return sent


# ------------------------------------------------------------- exact quadratics
@pytest.mark.parametrize("kind", [UpdateKind.GRADIENT, UpdateKind.DELTA])
def test_second_order_sums_equal_the_measured_drop(kind: UpdateKind) -> None:
    run = _run(update_kind=kind, rounds=3)

    _drive(run, kind)

    assert run.engine.state == RunState.DONE
    assert sorted(run.second) == [0, 1, 2]
    for r in run.results:
        drop = r.measured_drop
        first = sum(p.score for p in r.parties)
        second = sum(run.second[r.round].scores.values())
        assert abs(drop) > 1e-2
        # The trapezoid is exact for a quadratic; the first order is off by
        # 0.5 s^T A s.
        assert second == pytest.approx(drop, rel=1e-5, abs=1e-6), r.round
        assert abs(first - drop) > 1e-3 * abs(drop), r.round
    assert any(p.bounded for p in run.results[1].parties)


def test_second_order_scores_follow_the_trapezoid_oracle() -> None:
    run = _run(rounds=2)

    sent = _drive(run, UpdateKind.GRADIENT)

    thetas = [np.zeros(SIZE, np.float32), *run.thetas]
    for t, r in enumerate(run.results):
        v_t, v_next = run.validator.grad(thetas[t]), run.validator.grad(thetas[t + 1])
        so = run.second[t]
        for p in r.parties:
            u = sent[t][p.party_id].astype(np.float64)
            coef = LR * p.weight * p.clip
            assert so.dots_next[p.party_id] == pytest.approx(float(v_next @ u))
            assert so.scores[p.party_id] == pytest.approx(
                coef * 0.5 * float((v_t + v_next) @ u), rel=1e-6
            )


def test_second_order_arrives_once_v_next_exists_last_after_the_run() -> None:
    # Inline (no executor), v_{t+1} is computed as round t+1 opens: round t's
    # digfl-2 is recorded right after its close, once the next model is published.
    run = _run(rounds=3)

    for t in range(3):
        for p, u in _updates(run, t, UpdateKind.GRADIENT).items():
            _submit(run.engine, p, t, u)
        run.engine.tick()
        assert sorted(run.second) == list(range(t + 1))

    assert run.events == [
        ("commit", 0),
        ("second", 0),
        ("commit", 1),
        ("second", 1),
        ("commit", 2),
        ("second", 2),  # the final extra gradient pass at theta_T
        ("finish", 0),
    ]
    assert len(run.validator.gradient_at) == 4  # v_0..v_2 and v_3 for digfl-2
    np.testing.assert_array_equal(run.validator.gradient_at[-1], run.thetas[-1])


def test_second_order_with_an_executor_matches_inline() -> None:
    inline = _run(rounds=2)
    _drive(inline, UpdateKind.GRADIENT)

    with futures.ThreadPoolExecutor(1) as pool:
        threaded = _run(executor=pool, rounds=2)
        _drive(threaded, UpdateKind.GRADIENT)

    assert [e for e in threaded.events if e[0] == "second"] == [
        ("second", 0),
        ("second", 1),
    ]
    for t in (0, 1):
        assert threaded.second[t].scores == pytest.approx(inline.second[t].scores)


class GatedSpill(MemorySpill):
    """A memory spill whose second-order reads wait for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def dot(self, round_index: int, party_id: str, v: np.ndarray) -> float | None:
        assert self.gate.wait(10), "gate never opened"
        return super().dot(round_index, party_id, v)


def _round(run: Run, t: int) -> None:
    for p, u in _updates(run, t, UpdateKind.GRADIENT).items():
        _submit(run.engine, p, t, u)
    run.engine.tick()


def _until(what: str, cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_second_order_close_does_not_wait_for_the_job_but_the_next_commit_does() -> (
    None
):
    spill = GatedSpill()
    with (
        futures.ThreadPoolExecutor(1) as vt,
        futures.ThreadPoolExecutor(1) as jobs,
    ):
        run = _run(executor=vt, second_executor=jobs, spill=spill, rounds=3)
        _round(run, 0)
        _until("round 1", lambda: run.engine.open_round == 1)

        _round(run, 1)  # round 0's job is blocked reading the spill
        events_after_1 = list(run.events)
        kept = spill.read(0, "a")
        closing_2 = threading.Thread(target=_round, args=(run, 2), daemon=True)
        closing_2.start()
        closing_2.join(0.3)
        blocked_2 = closing_2.is_alive()
        events_blocked = list(run.events)
        spill.gate.set()
        closing_2.join(10)

    assert events_after_1 == [("commit", 0), ("commit", 1)]
    assert kept is not None  # the spill of round 0 waits for its job
    # Round 2 is not committed before round 0's digfl-2: one round behind at most.
    assert blocked_2 and events_blocked == events_after_1
    assert not closing_2.is_alive()
    ev = run.events
    assert sorted(ev) == sorted(
        [
            *[("commit", t) for t in range(3)],
            *[("second", t) for t in range(3)],
            ("finish", 0),
        ]
    )
    assert ev[-1] == ("finish", 0)
    assert ev.index(("second", 0)) < ev.index(("commit", 2)) < ev.index(("second", 2))
    assert [e for e in ev if e[0] == "second"] == [("second", t) for t in range(3)]
    assert [spill.read(t, p) is None for t in (0, 1, 2) for p in N] == [True] * 9


def test_second_order_spill_is_dropped_once_scored() -> None:
    spill = GatedSpill()
    with futures.ThreadPoolExecutor(1) as pool:
        run = _run(executor=pool, spill=spill, rounds=2)
        _round(run, 0)
        time.sleep(0.05)
        run.engine.tick()
        held_while_scoring = spill.read(0, "a") is not None

        spill.gate.set()

        def scored() -> bool:
            run.engine.tick()  # the driver records finished jobs
            return 0 in run.second

        _until("round 0's digfl-2", scored)
        dropped_once_scored = spill.read(0, "a") is None
        _round(run, 1)

    assert held_while_scoring
    assert dropped_once_scored
    assert sorted(run.second) == [0, 1]
    assert [spill.read(t, p) for t in (0, 1) for p in N] == [None] * 6


# ------------------------------------------------------------------- the spill
def test_second_order_dir_spill_round_trip(tmp_path: Path) -> None:
    spill = DirSpill(tmp_path / "spill")
    u = np.arange(7, dtype=np.float32) / 3

    spill.commit(spill.stage(4, "p0", u))
    spill.commit(spill.stage(4, "../odd id", 2 * u))
    got = spill.read(4, "p0")

    assert got is not None
    np.testing.assert_array_equal(got, u)
    assert got.dtype == np.float32
    assert not got.flags.writeable
    odd = spill.read(4, "../odd id")
    assert odd is not None
    np.testing.assert_array_equal(odd, 2 * u)
    names = sorted(f.name for f in (tmp_path / "spill" / "round-000004").iterdir())
    assert names == ["index.txt", "updates.f32"]  # one file per round, any id
    assert spill.read(4, "p1") is None
    assert spill.read(5, "p0") is None
    spill.close()
    # A resumed aggregator finds them through the index alone.
    again = DirSpill(tmp_path / "spill")
    np.testing.assert_array_equal(again.read(4, "../odd id"), 2 * u)
    assert again.dot(4, "p0", np.ones(7)) == pytest.approx(float(u.sum()), rel=1e-6)
    assert again.read(4, "p1") is None


def test_second_order_dir_spill_refuses_bad_files(tmp_path: Path) -> None:
    def written(values: np.ndarray) -> DirSpill:
        spill = DirSpill(tmp_path)
        spill.drop(0)
        spill.commit(spill.stage(0, "p0", values))
        spill.flush()  # written in the background
        return spill

    data = tmp_path / "round-000000" / "updates.f32"
    index = tmp_path / "round-000000" / "index.txt"
    v = np.ones(3, np.float32)

    wrong_size = written(np.ones(4, np.float32)).dot(0, "p0", v)
    spill = written(np.ones(3, np.float32))
    data.write_bytes(data.read_bytes()[:-4])  # 2 of the 3 values
    truncated = (spill.read(0, "p0"), spill.dot(0, "p0", v))
    spill = written(np.ones(3, np.float32))
    data.write_bytes(np.full(3, 2.0, np.float32).tobytes())  # changed on disk
    corrupt = (spill.read(0, "p0"), spill.dot(0, "p0", v))
    written(np.ones(3, np.float32)).close()
    index.write_text("zz 0 3 0123456789abcdef\n70 0 3\n")  # garbage lines only
    garbage = DirSpill(tmp_path)
    unnamed = (garbage.read(0, "p0"), garbage.dot(0, "p0", v))

    assert wrong_size is None
    assert truncated == (None, None)
    assert corrupt == (None, None)
    assert unnamed == (None, None)


def test_second_order_dir_spill_drop_and_drop_all(tmp_path: Path) -> None:
    spill = DirSpill(tmp_path / "spill")
    for t in (0, 1, 2):
        spill.commit(spill.stage(t, "p0", np.ones(2, np.float32)))
    spill.flush()  # written in the background

    spill.drop(0)
    after_drop = sorted(d.name for d in (tmp_path / "spill").iterdir())
    spill.drop_all(keep=[2])
    after_keep = sorted(d.name for d in (tmp_path / "spill").iterdir())
    spill.drop(7)  # nothing there: no error

    assert after_drop == ["round-000001", "round-000002"]
    assert after_keep == ["round-000002"]
    assert spill.read(0, "p0") is None
    assert spill.read(2, "p0") is not None
    spill.drop_all()
    assert list((tmp_path / "spill").iterdir()) == []


def test_second_order_missing_update_falls_back_to_first_order(tmp_path: Path) -> None:
    spill = DirSpill(tmp_path)
    u = np.array([1.0, 2.0, -1.0], np.float32)
    spill.commit(spill.stage(3, "a", u))
    pending = PendingSecond(3, {"a": 0.5, "b": 0.25}, {"a": 1.0, "b": 2.0})
    v_next = np.array([0.5, 0.25, 1.0])

    so = pending.compute(v_next, spill)

    assert so.round == 3
    assert so.dots_next["a"] == pytest.approx(0.0)  # 0.5 + 0.5 - 1
    assert so.scores["a"] == pytest.approx(0.5 * 0.5 * (1.0 + 0.0))
    assert math.isnan(so.dots_next["b"])  # says the update was gone
    assert so.scores["b"] == pytest.approx(0.25 * 2.0)  # its digfl-1 score


def test_second_order_pending_of_a_committed_round() -> None:
    result = _result(0, {"a": (0.5, 0.25), "b": (0.5, 1.0)})

    grad = PendingSecond.of(result, 0.5, UpdateKind.GRADIENT)
    delta = PendingSecond.of(result, 0.5, UpdateKind.DELTA)

    assert grad.coef == {"a": 0.5 * 0.5 * 0.25, "b": 0.5 * 0.5}
    assert delta.coef == {"a": 0.5 * 0.25, "b": 0.5}
    assert grad.dots == {"a": 4.0, "b": 4.0}


def test_second_order_blocked_dot_matches_numpy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spill_module, "_READ_BLOCK", 4)
    rng = np.random.default_rng(0)
    v = rng.standard_normal(11)
    u = rng.standard_normal(11).astype(np.float32)

    assert blocked_dot(v, u) == pytest.approx(float(v @ u.astype(np.float64)))
    assert blocked_dot(v[:0], u[:0]) == 0.0


# ------------------------------------------------------------------- the ledger
def _result(t: int, parties: Mapping[str, tuple[float, float]]) -> RoundResult:
    """A round whose parties have (weight, clip); score = 0.1 x (t + 1)."""
    return RoundResult(
        round=t,
        outcome=RoundOutcome.OK,
        parties=tuple(
            PartyRound(
                party_id=p,
                num_samples=10,
                weight=w,
                score=0.1 * (t + 1),
                dot=4.0,
                update_norm=2.0,
                train_loss=0.5,
                submission_id=f"{p}:{t}",
                digest="ab" * 16,
                weight_samples=10,
                norm_bound=3.0,
                clip=c,
            )
            for p, (w, c) in parties.items()
        ),
        late=(),
        val_loss_before=2.0 - t,
        val_acc_before=0.5,
        val_loss_after=1.5 - t,
        val_acc_after=0.6,
        model_digest=f"m{t}",
    )


def _so(t: int, scores: Mapping[str, float]) -> SecondOrder:
    return SecondOrder(t, {p: 2 * s for p, s in scores.items()}, dict(scores))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / LEDGER_FILE) as led:
        led.start_run("run-2", {"rounds": 3}, "val")
        for p in ("a", "b"):
            led.upsert_party(p, 10)
        yield led


def test_second_order_ledger_pending_until_recorded(ledger: Ledger) -> None:
    for t in range(3):
        ledger.record_round(_result(t, {"a": (0.5, 1.0), "b": (0.5, 0.5)}))
    score2 = {0: {"a": 0.3, "b": -0.1}, 1: {"a": 0.2, "b": 0.05}}
    for t, s in score2.items():
        ledger.record_second_order(_so(t, s))

    early = ledger.contributions(method="digfl-2")
    ledger.record_second_order(_so(2, {"a": 0.01, "b": 0.02}))
    full = ledger.contributions(method="digfl-2")
    first = ledger.contributions(method="digfl-1")

    assert early.method == "digfl-2"
    assert early.pending_rounds == (2,)
    totals = {pc.party_id: pc.total for pc in early.parties}
    assert totals == pytest.approx({"a": 0.5, "b": -0.05})
    assert [pc.round_indices for pc in early.parties] == [(0, 1), (0, 1)]
    assert full.pending_rounds == ()
    assert {pc.party_id: pc.total for pc in full.parties} == pytest.approx(
        {"a": 0.51, "b": -0.03}
    )
    assert first.pending_rounds == ()
    assert {pc.party_id: pc.total for pc in first.parties} == pytest.approx(
        {"a": 0.6, "b": 0.6}
    )
    rows = ledger.rounds()
    assert [p.score2 for p in rows[1].parties] == [0.2, 0.05]
    assert [p.dot_next for p in rows[1].parties] == [0.4, 0.1]
    assert {pc.party_id: pc.bounded_rounds for pc in full.parties} == {"a": 0, "b": 3}


def test_second_order_ledger_refuses_unknown_rows_atomically(ledger: Ledger) -> None:
    ledger.record_round(_result(0, {"a": (1.0, 1.0)}))

    with pytest.raises(
        FedGrpcError, match="round 0: no recorded row for party zz"
    ) as e:
        ledger.record_second_order(_so(0, {"a": 0.5, "zz": 0.1}))
    with pytest.raises(FedGrpcError, match="round 5: no recorded row for party a"):
        ledger.record_second_order(_so(5, {"a": 0.5}))

    assert e.value.code is ErrorCode.NOT_FOUND
    assert math.isnan(ledger.rounds()[0].parties[0].score2)  # rolled back


def test_second_order_ledger_unknown_method(ledger: Ledger) -> None:
    with pytest.raises(ConfigError, match="unknown scoring method 'digfl-3'"):
        ledger.contributions(method="digfl-3")


def test_second_order_ledger_is_unchanged_content_when_score2_lands(
    ledger: Ledger,
) -> None:
    result = _result(0, {"a": (1.0, 1.0)})
    ledger.record_round(result)
    ledger.record_second_order(_so(0, {"a": 0.5}))

    ledger.record_round(result)  # a retried commit stays a no-op

    assert ledger.rounds()[0].parties[0].score2 == 0.5


def test_second_order_engine_into_ledger_totals_add_up(tmp_path: Path) -> None:
    with Ledger(tmp_path / LEDGER_FILE) as led:
        led.start_run("run-e", {}, "val")
        run = _run(rounds=3, ledger=led)

        _drive(run, UpdateKind.GRADIENT)
        two = led.contributions(method="digfl-2")
        rounds = led.rounds()

    assert two.pending_rounds == ()
    assert all(math.isfinite(p.score2) for r in rounds for p in r.parties)
    total = sum(pc.total for pc in two.parties)
    assert total == pytest.approx(sum(r.measured_drop for r in rounds), rel=1e-5)
    for r in rounds:
        assert r.predicted("digfl-2") == pytest.approx(
            sum(run.second[r.round].scores.values())
        )


# ------------------------------------------------------------------- migration
_SCHEMA_1 = """
CREATE TABLE run (
    id INTEGER PRIMARY KEY CHECK (id = 1), run_id TEXT NOT NULL,
    created_at REAL NOT NULL, config TEXT NOT NULL, validation_digest TEXT NOT NULL,
    method TEXT NOT NULL, method_version TEXT NOT NULL
);
CREATE TABLE parties (
    party_id TEXT PRIMARY KEY, num_samples INTEGER NOT NULL CHECK (num_samples >= 0),
    attack TEXT NOT NULL DEFAULT '', joined_at REAL NOT NULL, last_seen REAL NOT NULL
);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY CHECK (round >= 0), status TEXT NOT NULL,
    val_loss_before REAL, val_acc_before REAL, val_loss_after REAL,
    val_acc_after REAL, predicted_drop REAL, measured_drop REAL, duration_s REAL,
    val_grad_s REAL, aggregate_s REAL, model_digest TEXT NOT NULL,
    submitted TEXT NOT NULL, late TEXT NOT NULL, closed_at REAL NOT NULL,
    extra TEXT NOT NULL, content_digest TEXT NOT NULL
);
CREATE TABLE party_rounds (
    round INTEGER NOT NULL REFERENCES rounds(round) ON DELETE CASCADE,
    party_id TEXT NOT NULL, seq INTEGER NOT NULL,
    num_samples INTEGER NOT NULL CHECK (num_samples >= 0), weight REAL, score REAL,
    dot REAL, update_norm REAL, train_loss REAL, submission_id TEXT NOT NULL,
    digest TEXT NOT NULL, PRIMARY KEY (round, party_id)
);
CREATE INDEX party_rounds_by_party ON party_rounds (party_id, round);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO run VALUES (1, 'old-run', 1.0, '{}', 'val', 'digfl', '1');
INSERT INTO parties VALUES ('p0', 50, '', 1.0, 2.0);
INSERT INTO rounds VALUES (0, 'ok', 2.0, 0.1, 1.5, 0.3, 0.4, 0.5, 1.0, 0.1, 0.1,
    'm0', '["p0"]', '[]', 3.0, '{}', 'digest');
INSERT INTO party_rounds VALUES (0, 'p0', 0, 50, 1.0, 0.4, 0.8, 1.25, 0.7, 's0',
    'abab');
PRAGMA user_version = 1;
"""


def _schema_1_ledger(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_SCHEMA_1)
    finally:
        conn.close()


def test_second_order_schema_1_ledger_migrates(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    _schema_1_ledger(path)

    with pytest.raises(ConfigError, match="has schema 1; open it once for writing"):
        Ledger.open_readonly(path)
    with Ledger(path) as led:
        rounds = led.rounds()
        report = led.contributions(method="digfl-2")
        led.record_second_order(SecondOrder(0, {"p0": 0.6}, {"p0": 0.35}))
        after = led.contributions(method="digfl-2")
    with Ledger.open_readonly(path) as ro:
        reread = ro.rounds()
    conn = sqlite3.connect(path)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()

    assert version == SCHEMA_VERSION == 2
    (p,) = rounds[0].parties
    assert (p.party_id, p.num_samples, p.weight, p.score, p.dot) == (
        "p0",
        50,
        1.0,
        0.4,
        0.8,
    )
    assert (p.clip, p.weight_samples, p.norm_bound) == (1.0, 0, math.inf)
    assert not p.bounded
    assert math.isnan(p.score2) and math.isnan(p.dot_next)
    assert rounds[0].measured_drop == 0.5
    assert report.pending_rounds == (0,)
    assert [pc.total for pc in report.parties] == [0.0]
    assert after.pending_rounds == ()
    assert [pc.total for pc in after.parties] == [0.35]
    assert reread[0].parties[0].score2 == 0.35
