"""Contribution reports as a text table, JSON or CSV."""

from __future__ import annotations

import csv
import io
from typing import Any

from fedgrpc.types import ContributionReport, PartyContribution


def final_train_loss(pc: PartyContribution) -> float:
    """The party's last reported training loss."""
    return pc.rounds[-1].train_loss if pc.rounds else float("nan")


def report_table(report: ContributionReport) -> str:
    """A readable table ranking parties by cumulative DIG-FL contribution."""
    lines = [
        f"run {report.run_id} · {report.method} · {report.rounds_done} rounds recorded"
    ]
    head = (
        f"{'rank':>4}  {'party':<14} {'attack':<16} {'samples':>7} {'rounds':>6} "
        f"{'contribution':>13} {'share':>8} {'ref share':>9} {'train loss':>10}"
    )
    lines += [head, "-" * len(head)]
    for i, pc in enumerate(report.parties, 1):
        samples = pc.rounds[-1].num_samples if pc.rounds else 0
        lines.append(
            f"{i:>4}  {pc.party_id:<14} {pc.attack or '-':<16} {samples:>7} "
            f"{len(pc.rounds):>6} {pc.total:>13.5f} {pc.share:>8.1%} "
            f"{pc.reference_share:>9.1%} {final_train_loss(pc):>10.4f}"
        )
    ok = [r for r in report.rounds if r.ok]
    if ok:
        last = ok[-1]
        pred = sum(r.predicted_drop for r in ok)
        meas = sum(r.measured_drop for r in ok)
        lines.append("")
        lines.append(
            f"validation: loss {ok[0].val_loss_before:.4f} -> "
            f"{last.val_loss_after:.4f}, "
            f"accuracy {ok[0].val_acc_before:.4f} -> {last.val_acc_after:.4f}"
        )
        if len(report.parties) > 1:
            lines.append(
                f"first-order fidelity: predicted drop {pred:.4f} vs measured "
                f"{meas:.4f}"
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


def report_json(report: ContributionReport) -> dict[str, Any]:
    """Every per-round per-party signed score, totals, shares and round metrics."""
    rounds: dict[int, dict[str, float]] = {}
    for pc in report.parties:
        for t, pr in zip(pc.round_indices, pc.rounds, strict=True):
            rounds.setdefault(t, {})[pc.party_id] = pr.score
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
                predicted_drop=sum(rounds.get(t, {}).values()),
                measured_drop=r.measured_drop,
                late=list(r.late),
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
    }


def report_csv(report: ContributionReport) -> str:
    """One row per (round, party): signed score, weight, samples, norm, train loss."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "round",
            "party_id",
            "score",
            "weight",
            "num_samples",
            "update_norm",
            "train_loss",
        ]
    )
    rows = []
    for pc in report.parties:
        for t, pr in zip(pc.round_indices, pc.rounds, strict=True):
            rows.append(
                (
                    t,
                    pc.party_id,
                    pr.score,
                    pr.weight,
                    pr.num_samples,
                    pr.update_norm,
                    pr.train_loss,
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
            ]
        )
    return buf.getvalue()
