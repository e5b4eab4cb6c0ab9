from __future__ import annotations

from pathlib import Path

from fedgrpc.cli.plots import plot_contributions
from fedgrpc.types import ContributionReport, PartyContribution, PartyRound

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _party_round(pid: str, score: float) -> PartyRound:
    return PartyRound(
        party_id=pid,
        num_samples=10,
        weight=0.5,
        score=score,
        dot=score,
        update_norm=1.0,
        train_loss=0.5,
    )


def _contribution(
    pid: str, scores: dict[int, float], attack: str = ""
) -> PartyContribution:
    return PartyContribution(
        party_id=pid,
        total=sum(scores.values()),
        share=0.0,
        reference_share=0.0,
        rounds=tuple(_party_round(pid, s) for s in scores.values()),
        round_indices=tuple(scores),
        attack=attack,
    )


def test_plot_contributions_writes_png(tmp_path: Path) -> None:
    report = ContributionReport(
        run_id="run-1",
        method="digfl-1",
        parties=(
            _contribution("a", {0: 0.3, 1: 0.2, 2: 0.1}),
            _contribution("b", {0: 0.1, 2: 0.4}),
            _contribution("c", {0: -0.2, 1: -0.1, 2: 0.05}, attack="label-flip:0.8"),
        ),
        rounds=(),
        rounds_done=3,
    )
    path = tmp_path / "plots" / "contributions.png"

    plot_contributions(report, path)

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def test_plot_contributions_empty_report_still_writes_png(tmp_path: Path) -> None:
    report = ContributionReport(
        run_id="", method="", parties=(), rounds=(), rounds_done=0
    )
    path = tmp_path / "empty.png"

    plot_contributions(report, path)

    assert path.read_bytes().startswith(PNG_MAGIC)
