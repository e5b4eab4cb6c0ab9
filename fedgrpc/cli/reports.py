"""Contribution reports as a text table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from fedgrpc.types import ContributionReport, PartyContribution


def final_train_loss(pc: PartyContribution) -> float:
    """The party's last reported training loss."""
    return pc.rounds[-1].train_loss if pc.rounds else float("nan")


def report_table(report: ContributionReport, top: int = 0) -> str:
    """A readable table ranking parties by cumulative DIG-FL contribution.

    With ``top`` > 0 and more than ``2 * top + 1`` parties, only the ``top`` best and
    the ``top`` worst are listed (keeping their ranks), with a count of the rest.
    """
    lines = [
        f"run {report.run_id} · {report.method} · {report.rounds_done} rounds recorded"
    ]
    # Client sampling or server momentum: how often each party was asked, what one
    # of its rounds was worth, and the momentum carry in its total (docs/strategies.md).
    partial = any(r.sampled is not None or r.carry for r in report.rounds)
    head = (
        f"{'rank':>4}  {'party':<14} {'attack':<16} {'samples':>7} {'rounds':>6} "
        f"{'contribution':>13} {'share':>8} {'ref share':>9} {'train loss':>10} "
        f"{'bounded':>8}"
    )
    if partial:
        head += f" {'asked':>6} {'per round':>10} {'carry':>9}"
    lines += [head, "-" * len(head)]
    n = len(report.parties)
    hidden = range(top, n - top) if top > 0 and 2 * top + 1 < n else range(0)
    for i, pc in enumerate(report.parties, 1):
        if i - 1 in hidden:
            if i - 1 == hidden.start:
                lines.append(
                    f"{'...':>4}  {len(hidden)} parties ranked {hidden.start + 1}-"
                    f"{hidden.stop} not shown"
                )
            continue
        samples = pc.rounds[-1].num_samples if pc.rounds else 0
        bounded = f"{pc.bounded_rounds}{' !' if pc.flagged else ''}"
        line = (
            f"{i:>4}  {pc.party_id:<14} {pc.attack or '-':<16} {samples:>7} "
            f"{len(pc.rounds):>6} {pc.total:>13.5f} {pc.share:>8.1%} "
            f"{pc.reference_share:>9.1%} {final_train_loss(pc):>10.4f} {bounded:>8}"
        )
        if partial:
            line += (
                f" {pc.asked_rounds:>6} {pc.per_participation:>10.5f} {pc.carry:>9.5f}"
            )
        lines.append(line)
    flagged = [pc.party_id for pc in report.parties if pc.flagged]
    if flagged:
        named = flagged[:top] if hidden and len(flagged) > top else flagged
        more = (
            f" and {len(flagged) - len(named)} more"
            if len(named) < len(flagged)
            else ""
        )
        lines.append(
            f"flagged (norm-bounded in >= 1/4 of their rounds): {', '.join(named)}"
            f"{more}"
        )
    if report.pending_rounds:
        lines.append(
            f"{report.method} pending for rounds "
            f"{', '.join(map(str, report.pending_rounds))} (scored one round late)"
        )
    if report.private:
        lines.append(
            "(your own view: shares, round metrics and other parties are withheld)"
        )
    ok = [r for r in report.rounds if r.ok and r.round not in report.pending_rounds]
    if ok and not report.private:
        last = ok[-1]
        pred = sum(r.predicted(report.method) for r in ok)
        meas = sum(r.measured_drop for r in ok)
        lines.append("")
        lines.append(
            f"validation: loss {ok[0].val_loss_before:.4f} -> "
            f"{last.val_loss_after:.4f}, "
            f"accuracy {ok[0].val_acc_before:.4f} -> {last.val_acc_after:.4f}"
        )
        if len(report.parties) > 1:
            lines.append(
                f"{report.method} fidelity: credits sum to {pred:.4f}, measured drop "
                f"{meas:.4f} (residual {meas - pred:+.4f})"
            )
            other = "digfl-2" if report.method == "digfl-1" else "digfl-1"
            pred2 = sum(r.predicted(other) for r in ok)
            if math.isfinite(pred2):
                lines.append(
                    f"{other} fidelity: credits sum to {pred2:.4f} (residual "
                    f"{meas - pred2:+.4f}); choose with --method"
                )
            low = low_fidelity_rounds(report)
            if low:
                lines.append(
                    f"low-fidelity rounds (|residual| > {LOW_FIDELITY:.0%} of the "
                    f"measured drop): {', '.join(map(str, low))}"
                )
        else:
            # A party's own view holds only its own scores: comparing them with the
            # federation's measured drop would be meaningless (unless it is alone).
            who = report.parties[0].party_id if report.parties else "this party"
            lines.append(
                f"predicted drop from {who}: {pred:.4f} (the federation's whole "
                f"model dropped {meas:.4f}; comparable only if it is the only party)"
            )
    failed = [r for r in report.rounds if not r.ok]
    if failed:
        lines.append(
            f"failed rounds: {', '.join(f'{r.round} ({r.status})' for r in failed)}"
        )
    return "\n".join(lines)


LOW_FIDELITY = 0.5
"""A round whose |r_t| exceeds this fraction of its |measured drop| is flagged."""


def low_fidelity_rounds(report: ContributionReport) -> list[int]:
    """Scored rounds whose credits miss the measured drop by more than LOW_FIDELITY.

    Rounds whose measured drop is within 1e-6 of zero are judged against 1e-6.
    """
    out = []
    for r in report.rounds:
        if not r.ok or r.round in report.pending_rounds or not r.parties:
            continue
        resid = r.residual(report.method)
        if abs(resid) > LOW_FIDELITY * max(abs(r.measured_drop), 1e-6):
            out.append(r.round)
    return out


def report_json(report: ContributionReport) -> dict[str, Any]:
    """Every per-round per-party signed score, totals, shares and round metrics."""
    rounds: dict[int, dict[str, float]] = {}
    for pc in report.parties:
        for t, pr in zip(pc.round_indices, pc.rounds, strict=True):
            rounds.setdefault(t, {})[pc.party_id] = pr.method_score(report.method)
    metrics = {r.round: r for r in report.rounds}
    out_rounds = []
    for t in sorted(set(rounds) | set(metrics)):
        entry: dict[str, Any] = {"round": t, "scores": rounds.get(t, {})}
        r = metrics.get(t)
        if r is not None:
            entry.update(
                status=r.status,
                val_loss_before=r.val_loss_before,
                val_loss_after=r.val_loss_after,
                val_acc_before=r.val_acc_before,
                val_acc_after=r.val_acc_after,
                predicted_drop=sum(rounds.get(t, {}).values()) + sum(r.carry.values()),
                measured_drop=r.measured_drop,
                residual=r.measured_drop
                - sum(rounds.get(t, {}).values())
                - sum(r.carry.values()),
                late=list(r.late),
                carry=r.carry,
                sampled=None if r.sampled is None else list(r.sampled),
                strategy=r.extra.get("strategy", "samples"),
            )
        out_rounds.append(entry)
    return {
        "run_id": report.run_id,
        "method": report.method,
        "rounds": out_rounds,
        "totals": {pc.party_id: pc.total for pc in report.parties},
        "shares": {pc.party_id: pc.share for pc in report.parties},
        "reference_shares": {pc.party_id: pc.reference_share for pc in report.parties},
        "attacks": {pc.party_id: pc.attack for pc in report.parties},
        "bounded_rounds": {pc.party_id: pc.bounded_rounds for pc in report.parties},
        "asked_rounds": {pc.party_id: pc.asked_rounds for pc in report.parties},
        "per_participation": {
            pc.party_id: pc.per_participation for pc in report.parties
        },
        "carry": {pc.party_id: pc.carry for pc in report.parties},
        "flagged": [pc.party_id for pc in report.parties if pc.flagged],
        "pending_rounds": list(report.pending_rounds),
        "low_fidelity_rounds": [] if report.private else low_fidelity_rounds(report),
        "private_view": report.private,
        "rows_digest": report.rows_digest,
    }


def report_csv(report: ContributionReport) -> str:
    """One row per (round, party): signed score, weight, samples, norm, train loss."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "round",
            "party_id",
            "score",  # under the report's method
            "weight",
            "num_samples",
            "update_norm",
            "train_loss",
            "clip",
            "score_digfl_1",
            "score_digfl_2",
        ]
    )
    rows = []
    for pc in report.parties:
        for t, pr in zip(pc.round_indices, pc.rounds, strict=True):
            rows.append(
                (
                    t,
                    pc.party_id,
                    pr.method_score(report.method),
                    pr.weight,
                    pr.num_samples,
                    pr.update_norm,
                    pr.train_loss,
                    pr.clip,
                    pr.score,
                    pr.score2,
                )
            )
    for row in sorted(rows, key=lambda r: (r[0], r[1])):
        w.writerow(
            [
                row[0],
                row[1],
                repr(row[2]),
                repr(row[3]),
                row[4],
                repr(row[5]),
                repr(row[6]),
                repr(row[7]),
                repr(row[8]),
                repr(row[9]),
            ]
        )
    return buf.getvalue()


def payout_doc(report: ContributionReport, amount: float, rule: str) -> dict[str, Any]:
    """The payout of ``amount`` over ``report``'s totals, with what re-derives it."""
    from fedgrpc.scoring.payouts import payouts

    scored = [
        r.round for r in report.rounds if r.ok and r.round not in report.pending_rounds
    ]
    rows = payouts({pc.party_id: pc.total for pc in report.parties}, amount, rule)
    return {
        "run_id": report.run_id,
        "method": report.method,
        "rule": rule,
        "amount": amount,
        "rounds": scored,
        "ledger_rows_sha256": report.rows_digest,
        "parties": [
            {
                "party_id": p.party_id,
                "total": p.total,
                "share": p.share,
                "amount": p.amount,
                "harmful": p.harmful,
            }
            for p in rows
        ],
        "harmful": [p.party_id for p in rows if p.harmful],
    }


def payout_table(doc: dict[str, Any]) -> str:
    """The payout as a readable table."""
    rounds = doc["rounds"]
    span = f"rounds {rounds[0]}-{rounds[-1]} ({len(rounds)})" if rounds else "no rounds"
    lines = [
        f"payout {doc['amount']:.2f} · run {doc['run_id']} · {doc['method']} · "
        f"{doc['rule']} · {span}",
        f"ledger rows sha256 {doc['ledger_rows_sha256']}",
        f"{'party':<16} {'total':>12} {'share':>8} {'amount':>12}",
    ]
    for p in doc["parties"]:
        note = "  harmful" if p["harmful"] else ""
        lines.append(
            f"{p['party_id']:<16} {p['total']:>12.5f} {p['share']:>8.1%} "
            f"{p['amount']:>12.2f}{note}"
        )
    return "\n".join(lines)


def payout_csv(doc: dict[str, Any]) -> str:
    """One row per party, with the run, method, rule and digest on every row."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["run_id", "method", "rule", "rounds", "ledger_rows_sha256", "party_id",
         "total", "share", "amount", "harmful"]
    )  # fmt: skip
    span = " ".join(map(str, doc["rounds"]))  # exactly the rounds used
    for p in doc["parties"]:
        w.writerow(
            [doc["run_id"], doc["method"], doc["rule"], span,
             doc["ledger_rows_sha256"], p["party_id"], repr(p["total"]),
             repr(p["share"]), f"{p['amount']:.2f}", int(p["harmful"])]
        )  # fmt: skip
    return buf.getvalue()
