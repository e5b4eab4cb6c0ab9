"""Contribution plots: cumulative DIG-FL score per party and per-round scores."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedgrpc.types import ContributionReport

log = logging.getLogger(__name__)

_MAX_LEGEND = 20  # beyond this many parties the legend hides the plot


def _label(party_id: str, attack: str) -> str:
    return f"{party_id} ({attack})" if attack else party_id


def plot_contributions(report: ContributionReport, path: Path) -> None:
    """Write a PNG with two panels: cumulative score per party, and per-round scores.

    The top panel draws Σ_{s<=t} φ_{s,i} against round t for every party (a round the
    party missed adds 0). The bottom panel draws φ_{t,i} as grouped, signed bars.
    Only rounds in which some listed party scored are on the x axis.
    """
    # Imported here: the headless backend must be chosen before pyplot loads, and the
    # server should not pay for matplotlib unless it plots.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = sorted({t for c in report.parties for t in c.round_indices})
    col = {t: k for k, t in enumerate(rounds)}
    scores = np.zeros((len(report.parties), len(rounds)))  # (n_parties, n_rounds)
    for i, c in enumerate(report.parties):
        for t, pr in zip(c.round_indices, c.rounds, strict=True):
            scores[i, col[t]] += pr.score
    cumulative = np.cumsum(scores, axis=1)  # (n_parties, n_rounds)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    try:
        title = f"DIG-FL contributions, run {report.run_id or '?'}"
        if report.method:
            title += f" ({report.method})"
        fig.suptitle(title)
        x = np.asarray(rounds, dtype=np.float64)
        n = max(1, len(report.parties))
        width = 0.8 / n
        for i, c in enumerate(report.parties):
            label = _label(c.party_id, c.attack)
            top.plot(x, cumulative[i], marker="o", markersize=3, label=label)
            bottom.bar(x - 0.4 + width * (i + 0.5), scores[i], width=width, label=label)
        top.axhline(0.0, color="black", linewidth=0.5)
        bottom.axhline(0.0, color="black", linewidth=0.5)
        top.set_ylabel("cumulative score Σ φ (loss drop)")
        bottom.set_ylabel("round score φ")
        bottom.set_xlabel("round")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not report.parties or not rounds:
            top.text(0.5, 0.5, "no scored rounds", ha="center", transform=top.transAxes)
        elif len(report.parties) <= _MAX_LEGEND:
            top.legend(fontsize="small", ncol=max(1, len(report.parties) // 10 + 1))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    log.info("wrote contribution plot %s", path)
