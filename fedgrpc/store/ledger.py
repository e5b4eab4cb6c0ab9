"""SQLite run ledger: run provenance, parties, rounds, per-party scores (DESIGN §6).

One file per run directory (``ledger.sqlite``) in WAL mode with ``synchronous=FULL``: a
round's row, its per-party rows and the resume state commit in one transaction, and a
crash at any moment loses at most the open round. Readers in other processes (the
``contributions`` and ``status`` commands) open the same file read-only while the
aggregator writes (:meth:`Ledger.open_readonly`).

Re-recording a round:

* byte-identical content (everything but the commit time) is a no-op, so a retried
  commit is safe;
* a round stored as failed ("failed: ...") may be superseded by a later attempt with the
  same number (quorum retries); the failed row is replaced, and a warning is logged;
* anything else raises :class:`~fedgrpc.errors.FedGrpcError` with code ALREADY_EXISTS.

Floats that are NaN are stored as SQL NULL (SQLite has no NaN) and read back as NaN.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from enum import Enum
from pathlib import Path, PurePath
from types import TracebackType
from typing import Any, Self

from fedgrpc.errors import ConfigError, ErrorCode, FedGrpcError
from fedgrpc.scoring import digfl
from fedgrpc.types import (
    SCORING_METHODS,
    ContributionReport,
    PartyContribution,
    PartyRound,
    RoundOutcome,
    RoundResult,
    SecondOrder,
    round_status_parse,
)

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite"
"""File name of the ledger inside a run directory."""

SCHEMA_VERSION = 2
"""Stored in ``PRAGMA user_version``; bump with a migration when the schema changes."""

_MIGRATIONS = {
    # 1 -> 2: bounded influence and digfl-2 (DESIGN §4).
    1: (
        "ALTER TABLE party_rounds ADD COLUMN weight_samples INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE party_rounds ADD COLUMN norm_bound REAL",
        "ALTER TABLE party_rounds ADD COLUMN clip REAL NOT NULL DEFAULT 1.0",
        "ALTER TABLE party_rounds ADD COLUMN dot_next REAL",
        "ALTER TABLE party_rounds ADD COLUMN score2 REAL",
    ),
}
"""Statements that bring a ledger of schema version k to k + 1."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_id TEXT NOT NULL,
    created_at REAL NOT NULL,          -- unix time (s)
    config TEXT NOT NULL,              -- JSON object
    validation_digest TEXT NOT NULL,   -- hex digest of the validation set
    method TEXT NOT NULL,              -- scoring method, e.g. "digfl"
    method_version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS parties (
    party_id TEXT PRIMARY KEY,
    num_samples INTEGER NOT NULL CHECK (num_samples >= 0),
    attack TEXT NOT NULL DEFAULT '',   -- simulated attack ("" = none)
    joined_at REAL NOT NULL,           -- unix time (s)
    last_seen REAL NOT NULL            -- unix time (s)
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY CHECK (round >= 0),
    status TEXT NOT NULL,              -- "ok" or "failed: <reason>"
    val_loss_before REAL,              -- NULL = NaN
    val_acc_before REAL,
    val_loss_after REAL,
    val_acc_after REAL,
    predicted_drop REAL,               -- sum of the round's scores
    measured_drop REAL,                -- val_loss_before - val_loss_after
    duration_s REAL,
    val_grad_s REAL,
    aggregate_s REAL,
    model_digest TEXT NOT NULL,
    submitted TEXT NOT NULL,           -- JSON list of party ids, in PartyRound order
    late TEXT NOT NULL,                -- JSON list of party ids
    closed_at REAL NOT NULL,           -- unix time (s) of the commit
    extra TEXT NOT NULL,               -- JSON object
    content_digest TEXT NOT NULL       -- SHA-256 of the canonical RoundResult JSON
);
CREATE TABLE IF NOT EXISTS party_rounds (
    round INTEGER NOT NULL REFERENCES rounds(round) ON DELETE CASCADE,
    party_id TEXT NOT NULL,
    seq INTEGER NOT NULL,              -- position in RoundResult.parties
    num_samples INTEGER NOT NULL CHECK (num_samples >= 0),
    weight REAL,
    score REAL,
    dot REAL,
    update_norm REAL,
    train_loss REAL,
    submission_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    weight_samples INTEGER NOT NULL DEFAULT 0,  -- the count the weight uses (capped)
    norm_bound REAL,                   -- the round's bound B_t (NULL = none)
    clip REAL NOT NULL DEFAULT 1.0,    -- c_i = min(1, B_t / update_norm)
    dot_next REAL,                     -- <v_{t+1}, u_{t,i}>, recorded one round later
    score2 REAL,                       -- digfl-2 score (NULL until recorded)
    PRIMARY KEY (round, party_id)
);
CREATE INDEX IF NOT EXISTS party_rounds_by_party ON party_rounds (party_id, round);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL                -- JSON
);
"""

_ROUND_COLUMNS = (
    "round, status, val_loss_before, val_acc_before, val_loss_after, val_acc_after, "
    "predicted_drop, measured_drop, duration_s, val_grad_s, aggregate_s, model_digest, "
    "submitted, late, closed_at, extra, content_digest"
)
_PARTY_COLUMNS = (
    "round, party_id, seq, num_samples, weight, score, dot, update_norm, train_loss, "
    "submission_id, digest, weight_samples, norm_bound, clip, dot_next, score2"
)


def _json_default(obj: object) -> Any:
    """Encode the few non-JSON types a config mapping carries; refuse the rest."""
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    item = getattr(obj, "item", None)  # NumPy scalars
    if callable(item):
        return item()
    raise TypeError(f"cannot store {type(obj).__name__} in the ledger as JSON")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _nan(value: float | None) -> float:
    """SQL NULL back to NaN."""
    return math.nan if value is None else float(value)


def _content_digest(result: RoundResult) -> str:
    """SHA-256 of a canonical JSON form of everything in ``result``.

    The form spells the outcome as the status string (``ok`` / ``failed: why``), as
    ledgers written before RoundOutcome did, so their digests still match.
    """
    doc = asdict(result)
    del doc["outcome"], doc["reason"]
    doc["status"] = result.status
    for party in doc["parties"]:  # recorded one round later: not the round's content
        del party["dot_next"], party["score2"]
    canonical = json.dumps(doc, sort_keys=True, default=_json_default)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _round_row(
    result: RoundResult, *, closed_at: float, extra_json: str, digest: str
) -> tuple[Any, ...]:
    """The ``rounds`` row of ``result``, in ``_ROUND_COLUMNS`` order."""
    return (
        result.round,
        result.status,
        result.val_loss_before,
        result.val_acc_before,
        result.val_loss_after,
        result.val_acc_after,
        result.predicted_drop,
        result.measured_drop,
        result.duration_s,
        result.val_grad_s,
        result.aggregate_s,
        result.model_digest,
        json.dumps([p.party_id for p in result.parties]),
        json.dumps(list(result.late)),
        closed_at,
        extra_json,
        digest,
    )


def _party_rows(result: RoundResult) -> list[tuple[Any, ...]]:
    """The ``party_rounds`` rows of ``result``, in ``_PARTY_COLUMNS`` order.

    ``seq`` keeps the order of ``result.parties``, which reading a round restores.
    """
    return [
        (
            result.round,
            p.party_id,
            seq,
            p.num_samples,
            p.weight,
            p.score,
            p.dot,
            p.update_norm,
            p.train_loss,
            p.submission_id,
            p.digest,
            p.weight_samples,
            None if math.isinf(p.norm_bound) else p.norm_bound,
            p.clip,
            p.dot_next,
            p.score2,
        )
        for seq, p in enumerate(result.parties)
    ]


def _round_from_row(r: sqlite3.Row, parties: tuple[PartyRound, ...]) -> RoundResult:
    """A RoundResult from its ``rounds`` row and its party rows."""
    outcome, reason = round_status_parse(r["status"])
    return RoundResult(
        round=int(r["round"]),
        outcome=outcome,
        reason=reason,
        parties=parties,
        late=tuple(json.loads(r["late"])),
        val_loss_before=_nan(r["val_loss_before"]),
        val_acc_before=_nan(r["val_acc_before"]),
        val_loss_after=_nan(r["val_loss_after"]),
        val_acc_after=_nan(r["val_acc_after"]),
        model_digest=r["model_digest"],
        duration_s=_nan(r["duration_s"]),
        val_grad_s=_nan(r["val_grad_s"]),
        aggregate_s=_nan(r["aggregate_s"]),
        extra=json.loads(r["extra"]),
    )


EVICTED_KEY = "evicted_parties"
"""State key: party ids an operator evicted (a JSON list)."""


class Ledger:
    """The run ledger: one SQLite file, one connection, guarded by a lock.

    Every public method is thread-safe. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        *,
        readonly: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (creating if needed) the ledger at ``path``.

        Args:
            path: The SQLite file, or a run directory holding ``ledger.sqlite``.
            readonly: Open without write access; safe while another process writes.
            clock: Source of unix timestamps (tests pass a fake one).

        Raises:
            ConfigError: ``readonly`` and there is no ledger at ``path``, or the file
                has a newer schema than this code knows.
        """
        path = Path(path)
        if path.is_dir():
            path = path / LEDGER_FILE
        self.path = path
        self.readonly = readonly
        self._clock = clock
        self._lock = threading.Lock()
        if readonly:
            if not path.is_file():
                raise ConfigError(f"no ledger at {path}")
            self._conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None
            )
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open_readonly(cls, path: Path) -> Ledger:
        """Open an existing ledger for reading only (another process may be writing)."""
        return cls(path, readonly=True)

    def _setup(self) -> None:
        conn = self._conn
        conn.row_factory = sqlite3.Row
        # Readers wait out a writer's checkpoint instead of failing with SQLITE_BUSY.
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA foreign_keys = ON")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"ledger {self.path} has schema {version}; this fedgrpc knows "
                f"{SCHEMA_VERSION}"
            )
        if self.readonly:
            if version < SCHEMA_VERSION:
                raise ConfigError(
                    f"ledger {self.path} has schema {version}; open it once for "
                    f"writing (fedgrpc serve --resume) to bring it to {SCHEMA_VERSION}"
                )
            return
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ConfigError(f"ledger {self.path}: cannot enable WAL (got {mode})")
        # FULL: fsync the WAL on every commit, so a committed round survives power loss.
        conn.execute("PRAGMA synchronous = FULL")
        with self._transaction():
            has_tables = (
                version > 0
                or conn.execute(
                    "SELECT COUNT(*) FROM sqlite_master WHERE name = 'party_rounds'"
                ).fetchone()[0]
            )
            for old in range(max(version, 1), SCHEMA_VERSION):
                if has_tables:
                    for statement in _MIGRATIONS[old]:
                        conn.execute(statement)
                    log.info("ledger %s: schema %d -> %d", self.path, old, old + 1)
            # Not executescript: it COMMITs first, which would split the transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- plumbing -------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error. Caller holds lock."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several SELECTs see one committed state."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def _writable(self) -> None:
        if self.readonly:
            raise FedGrpcError(
                f"ledger {self.path} is open read-only",
                code=ErrorCode.FAILED_PRECONDITION,
            )

    def checkpoint_wal(self) -> bool:
        """Copy the WAL into the database file now (SQLite checkpoint, PASSIVE).

        Without it the whole ledger can sit in ``ledger.sqlite-wal`` until a clean
        exit, and a damaged WAL then silently loses committed rounds. Returns
        whether every WAL frame reached the database (readers may hold some back).
        """
        self._writable()
        with self._lock:
            busy, frames, done = self._conn.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchone()
        return not busy and frames == done

    def backup(self, dest: Path) -> None:
        """A consistent copy of the ledger at ``dest``, made online (SQLite backup API).

        Safe while the aggregator writes: the copy is one committed state.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.backup.tmp")
        tmp.unlink(missing_ok=True)
        target = sqlite3.connect(tmp)
        try:
            with self._lock:
                self._conn.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
        finally:
            target.close()
        os.replace(tmp, dest)

    def close(self) -> None:
        """Close the connection; further calls fail."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def journal_mode(self) -> str:
        """The database's journal mode (``"wal"`` for a ledger)."""
        with self._lock:
            return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])

    # -- run --------------------------------------------------------------------------

    def start_run(
        self,
        run_id: str,
        config: Mapping[str, Any],
        validation_digest: str,
        method: str = "digfl",
        method_version: str = "1",
    ) -> None:
        """Record the run's provenance; on resume keep the existing row.

        Raises:
            ConfigError: The ledger already belongs to a different run id.
            TypeError: ``config`` holds values that cannot be stored as JSON.
        """
        self._writable()
        config_json = _dumps(dict(config))
        with self._lock, self._transaction() as conn:
            row = conn.execute("SELECT run_id FROM run WHERE id = 1").fetchone()
            if row is not None:
                if row["run_id"] != run_id:
                    raise ConfigError(
                        f"ledger {self.path} belongs to run {row['run_id']!r}, "
                        f"not {run_id!r}"
                    )
                log.info("resuming run %s from %s", run_id, self.path)
                return
            conn.execute(
                "INSERT INTO run (id, run_id, created_at, config, validation_digest, "
                "method, method_version) VALUES (1, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    self._clock(),
                    config_json,
                    validation_digest,
                    method,
                    method_version,
                ),
            )

    def run_info(self) -> dict[str, Any] | None:
        """The run row (config parsed from JSON), or None before :meth:`start_run`."""
        with self._snapshot() as conn:
            return self._run_info(conn)

    @staticmethod
    def _run_info(conn: sqlite3.Connection) -> dict[str, Any] | None:
        row = conn.execute(
            "SELECT run_id, created_at, config, validation_digest, method, "
            "method_version FROM run WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        info = dict(row)
        info["config"] = json.loads(info["config"])
        return info

    # -- parties ----------------------------------------------------------------------

    def upsert_party(self, party_id: str, num_samples: int, attack: str = "") -> None:
        """Insert a party or update its sample count, attack and last-seen time."""
        self._writable()
        now = self._clock()
        with self._lock, self._transaction() as conn:
            conn.execute(
                "INSERT INTO parties (party_id, num_samples, attack, joined_at, "
                "last_seen) VALUES (?, ?, ?, ?, ?) ON CONFLICT (party_id) DO UPDATE "
                "SET num_samples = excluded.num_samples, attack = excluded.attack, "
                "last_seen = excluded.last_seen",
                (party_id, int(num_samples), attack, now, now),
            )

    def parties(self) -> list[dict[str, Any]]:
        """Every party row, ordered by party id."""
        with self._snapshot() as conn:
            return self._parties(conn)

    @staticmethod
    def _parties(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        rows = conn.execute(
            "SELECT party_id, num_samples, attack, joined_at, last_seen "
            "FROM parties ORDER BY party_id"
        ).fetchall()
        return [dict(r) for r in rows]

    def evict_parties(self, party_ids: Sequence[str]) -> list[str]:
        """Drop parties from the registry and bar them from joining this run again.

        Their recorded rounds and scores stay (the ledger never rewrites history);
        they no longer count against ``max_parties`` and are not re-registered at
        ``--resume``. Returns the ids that were registered. One transaction.
        """
        self._writable()
        ids = list(dict.fromkeys(party_ids))
        with self._lock, self._transaction() as conn:
            marks = ",".join("?" * len(ids))
            found = [
                str(r[0])
                for r in conn.execute(
                    f"SELECT party_id FROM parties WHERE party_id IN ({marks})",
                    ids,
                )
            ]
            conn.execute(f"DELETE FROM parties WHERE party_id IN ({marks})", ids)
            row = conn.execute(
                "SELECT value FROM state WHERE key = ?", (EVICTED_KEY,)
            ).fetchone()
            evicted = set(json.loads(row["value"])) if row else set()
            conn.execute(
                "INSERT INTO state (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (EVICTED_KEY, _dumps(sorted(evicted | set(ids)))),
            )
        return sorted(found)

    def evicted(self) -> set[str]:
        """Party ids evicted from this run."""
        return {str(p) for p in self.get_state(EVICTED_KEY, [])}

    # -- rounds -----------------------------------------------------------------------

    def record_round(
        self, result: RoundResult, state: Mapping[str, Any] | None = None
    ) -> None:
        """Commit a round, its per-party rows and ``state`` in one transaction.

        See the module docstring for what re-recording a round does.

        Raises:
            FedGrpcError: (ALREADY_EXISTS) the round is stored with different content.
            TypeError: ``extra`` or ``state`` holds values that cannot be JSON.
            sqlite3.IntegrityError: A row breaks a constraint (negative round or
                sample count, a party twice in one round); nothing is committed.
        """
        self._writable()
        # Serialise before BEGIN, so a bad value fails without touching the database.
        digest = _content_digest(result)
        extra_json = _dumps(result.extra)
        state_rows = [(k, _dumps(v)) for k, v in (state or {}).items()]
        closed_at = self._clock()
        round_row = _round_row(
            result, closed_at=closed_at, extra_json=extra_json, digest=digest
        )
        party_rows = _party_rows(result)
        with self._lock, self._transaction() as conn:
            old = conn.execute(
                "SELECT status, content_digest FROM rounds WHERE round = ?",
                (result.round,),
            ).fetchone()
            if old is not None:
                if old["content_digest"] == digest:
                    log.debug("round %d already recorded identically", result.round)
                    return
                if round_status_parse(old["status"])[0] is RoundOutcome.OK:
                    raise FedGrpcError(
                        f"round {result.round} is already recorded as "
                        f"{old['status']!r} with different content",
                        code=ErrorCode.ALREADY_EXISTS,
                    )
                log.warning(
                    "round %d: replacing recorded %r with a new attempt (%r)",
                    result.round,
                    old["status"],
                    result.status,
                )
                conn.execute("DELETE FROM rounds WHERE round = ?", (result.round,))
            conn.execute(
                f"INSERT INTO rounds ({_ROUND_COLUMNS}) VALUES "
                f"({', '.join('?' * len(round_row))})",
                round_row,
            )
            if party_rows:
                conn.executemany(
                    f"INSERT INTO party_rounds ({_PARTY_COLUMNS}) VALUES "
                    f"({', '.join('?' * len(party_rows[0]))})",
                    party_rows,
                )
                conn.executemany(
                    "UPDATE parties SET last_seen = ? WHERE party_id = ?",
                    [(closed_at, p.party_id) for p in result.parties],
                )
            if state_rows:
                conn.executemany(
                    "INSERT INTO state (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    state_rows,
                )

    def record_second_order(self, so: SecondOrder) -> None:
        """Store a round's digfl-2 scores (computed one round after its commit).

        Raises:
            FedGrpcError: (NOT_FOUND) the round or a party row is not recorded.
        """
        self._writable()
        rows = [(so.dots_next[p], so.scores[p], so.round, p) for p in sorted(so.scores)]
        with self._lock, self._transaction() as conn:
            for row in rows:
                cur = conn.execute(
                    "UPDATE party_rounds SET dot_next = ?, score2 = ? "
                    "WHERE round = ? AND party_id = ?",
                    row,
                )
                if cur.rowcount != 1:
                    raise FedGrpcError(
                        f"round {so.round}: no recorded row for party {row[3]}",
                        code=ErrorCode.NOT_FOUND,
                    )

    def rounds(
        self, from_round: int = 0, to_round: int | None = None
    ) -> list[RoundResult]:
        """Recorded rounds with ``from_round <= round <= to_round``, in round order."""
        with self._snapshot() as conn:
            return self._rounds(conn, from_round, to_round)

    @staticmethod
    def _rounds(
        conn: sqlite3.Connection, from_round: int, to_round: int | None
    ) -> list[RoundResult]:
        upper = to_round if to_round is not None else -1
        round_rows = conn.execute(
            f"SELECT {_ROUND_COLUMNS} FROM rounds WHERE round >= ? "
            "AND (? < 0 OR round <= ?) ORDER BY round",
            (from_round, upper, upper),
        ).fetchall()
        party_rows = conn.execute(
            f"SELECT {_PARTY_COLUMNS} FROM party_rounds WHERE round >= ? "
            "AND (? < 0 OR round <= ?) ORDER BY round, seq",
            (from_round, upper, upper),
        ).fetchall()
        by_round: dict[int, list[PartyRound]] = {}
        for r in party_rows:
            by_round.setdefault(r["round"], []).append(
                PartyRound(
                    party_id=r["party_id"],
                    num_samples=int(r["num_samples"]),
                    weight=_nan(r["weight"]),
                    score=_nan(r["score"]),
                    dot=_nan(r["dot"]),
                    update_norm=_nan(r["update_norm"]),
                    train_loss=_nan(r["train_loss"]),
                    submission_id=r["submission_id"],
                    digest=r["digest"],
                    weight_samples=int(r["weight_samples"]),
                    norm_bound=(
                        math.inf if r["norm_bound"] is None else float(r["norm_bound"])
                    ),
                    clip=float(r["clip"]),
                    dot_next=_nan(r["dot_next"]),
                    score2=_nan(r["score2"]),
                )
            )
        return [
            _round_from_row(r, tuple(by_round.get(r["round"], ()))) for r in round_rows
        ]

    # -- resume state -----------------------------------------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under ``key``, or ``default``."""
        with self._lock:
            row = self._conn.execute(
                "SELECT value FROM state WHERE key = ?", (key,)
            ).fetchone()
        return default if row is None else json.loads(row["value"])

    def set_state(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key`` (its own transaction)."""
        self._writable()
        value_json = _dumps(value)
        with self._lock, self._transaction() as conn:
            conn.execute(
                "INSERT INTO state (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value_json),
            )

    # -- contributions ----------------------------------------------------------------

    def contributions(
        self,
        party_ids: Sequence[str] | None = None,
        from_round: int = 0,
        to_round: int | None = None,
        method: str = "digfl-1",
    ) -> ContributionReport:
        """DIG-FL contributions over the selected rounds (``to_round`` inclusive).

        ``method``: ``digfl-1`` (first order) or ``digfl-2`` (trapezoid; a round whose
        second-order scores are not recorded yet, the newest, counts as pending and
        adds nothing). Failed rounds are listed in ``rounds`` but contribute no
        scores. Totals, shares and reference shares are computed over every party,
        then filtered to ``party_ids``, so a share stays a fraction of the whole drop.
        ``rounds`` holds the full RoundResults, other parties' rows included: callers
        that show a report to a party must not forward ``RoundResult.parties``.
        ``rounds_done`` counts every recorded round (ok or failed) in the ledger,
        whatever the range.

        Raises:
            ConfigError: an unknown method.
        """
        if method not in SCORING_METHODS:
            raise ConfigError(
                f"unknown scoring method {method!r}; choose one of {SCORING_METHODS}"
            )
        with self._snapshot() as conn:
            info = self._run_info(conn)
            selected = self._rounds(conn, from_round, to_round)
            party_rows = {p["party_id"]: p for p in self._parties(conn)}
            rounds_done = int(conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
            rows_digest = self._rows_digest(conn, from_round, to_round)

        scored = [r for r in selected if r.ok]
        pending = tuple(
            r.round for r in scored if not math.isfinite(r.predicted(method))
        )
        scored = [r for r in scored if r.round not in pending]
        per_round = [r.scores(method) for r in scored]
        known = list(dict.fromkeys([*party_rows, *(p for s in per_round for p in s)]))
        total = dict.fromkeys(known, 0.0)
        total.update(digfl.totals(per_round))
        share = digfl.shares(total)
        reference = digfl.reference_shares(per_round)

        wanted = known if party_ids is None else list(dict.fromkeys(party_ids))
        entries: list[PartyContribution] = []
        for pid in wanted:
            history = [
                (r.round, p) for r in scored for p in r.parties if p.party_id == pid
            ]
            entries.append(
                PartyContribution(
                    party_id=pid,
                    total=total.get(pid, 0.0),
                    share=share.get(pid, 0.0),
                    reference_share=reference.get(pid, 0.0),
                    rounds=tuple(p for _, p in history),
                    round_indices=tuple(t for t, _ in history),
                    attack=str(party_rows.get(pid, {}).get("attack", "")),
                    bounded_rounds=sum(1 for _, p in history if p.bounded),
                    asked_rounds=sum(1 for r in scored if _asked(r, pid)),
                    carry=sum(r.carry.get(pid, 0.0) for r in scored),
                )
            )
        entries.sort(key=lambda c: (-c.total, c.party_id))
        return ContributionReport(
            run_id="" if info is None else str(info["run_id"]),
            method=method,
            parties=tuple(entries),
            rounds=tuple(selected),
            rounds_done=rounds_done,
            pending_rounds=pending,
            rows_digest=rows_digest,
        )

    def rows_digest(self, from_round: int = 0, to_round: int | None = None) -> str:
        """SHA-256 over the selected rounds' recorded rows (round and party rows).

        A payout quotes it, so anyone holding the ledger can check the payout was
        derived from exactly these rows.
        """
        with self._snapshot() as conn:
            return self._rows_digest(conn, from_round, to_round)

    @staticmethod
    def _rows_digest(
        conn: sqlite3.Connection, from_round: int, to_round: int | None
    ) -> str:
        h = hashlib.sha256()
        upper = to_round if to_round is not None else -1
        for table, cols, order in (
            ("rounds", _ROUND_COLUMNS.replace("closed_at, ", ""), "round"),
            ("party_rounds", _PARTY_COLUMNS, "round, seq"),
        ):
            for row in conn.execute(
                f"SELECT {cols} FROM {table} WHERE round >= ? "
                f"AND (? < 0 OR round <= ?) ORDER BY {order}",
                (from_round, upper, upper),
            ):
                h.update(_dumps(list(row)).encode())
                h.update(b"\n")
        return h.hexdigest()


def _asked(result: RoundResult, party: str) -> bool:
    """Whether ``party`` was asked to train in the round.

    Sampled, or (without sampling) it submitted or was late.
    """
    sampled = result.sampled
    if sampled is not None:
        return party in sampled
    return party in result.late or any(p.party_id == party for p in result.parties)
