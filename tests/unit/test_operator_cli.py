"""Issue 12's command-line truths: help and defaults, certs, hints, reports, status."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fedgrpc.cli.main import all_parsers, build_parser, main
from fedgrpc.cli.reports import report_table
from fedgrpc.config import RoundConfig, ServerConfig
from fedgrpc.datasets.sources import load_dataset
from fedgrpc.engine import RoundEngine
from fedgrpc.errors import ConfigError
from fedgrpc.factories import load_factory
from fedgrpc.types import ContributionReport, PartyContribution, RunState
from tests.unit.test_engine import N3, SPECS, THETA_0, FakeClock, QuadraticValidator

EXEMPT = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _options() -> list[tuple[argparse.ArgumentParser, argparse.Action]]:
    return [
        (p, a)
        for p in all_parsers(build_parser())
        for a in p._actions
        if not isinstance(a, EXEMPT)
    ]


def _run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------- --help


def test_help_every_option_and_argument_has_help_text() -> None:
    missing = [
        f"{p.prog} {a.option_strings or a.dest}" for p, a in _options() if not a.help
    ]

    assert missing == []


@pytest.mark.parametrize(
    "command",
    ["serve", "client", "simulate", "split", "contributions", "status", "shapley"],
)
def test_help_shows_every_default(command: str) -> None:
    parser = next(
        p for p in all_parsers(build_parser()) if p.prog == f"fedgrpc {command}"
    )

    text = " ".join(parser.format_help().split())

    for a in parser._actions:
        if isinstance(a, EXEMPT) or a.nargs == 0 or not a.option_strings:
            continue
        if a.default is None or a.default == [] or a.default is argparse.SUPPRESS:
            continue
        assert f"(default: {a.default})" in text, (command, a.option_strings)


def test_quiet_after_the_command_is_honoured_and_not_overwritten() -> None:
    parser = build_parser()

    after = parser.parse_args(["simulate", "-q"])
    before = parser.parse_args(["-q", "simulate"])
    neither = parser.parse_args(["simulate"])

    assert after.quiet and before.quiet and not neither.quiet


def test_grace_period_default_and_validation() -> None:
    args = build_parser().parse_args(["serve", "--insecure"])

    assert args.grace_period == ServerConfig(insecure=True).grace_period_s == 300.0
    with pytest.raises(ConfigError, match="grace period"):
        ServerConfig(insecure=True, grace_period_s=-1)


# -------------------------------------------------------------------- certs


def _sans(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def _signed_by(cert_path: Path, ca_path: Path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def test_certs_init_name_adds_to_the_default_names(tmp_path: Path) -> None:
    code, _, err = _run_main(
        ["certs", "init", str(tmp_path), "--name", "agg.example.org"]
    )

    assert code == 0, err
    assert _sans(tmp_path / "server.pem") == [
        "agg.example.org",
        "localhost",
        "127.0.0.1",
        "::1",
    ]
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "agg.example.org"


def test_certs_init_no_default_names_needs_a_name(tmp_path: Path) -> None:
    code, _, err = _run_main(["certs", "init", str(tmp_path), "--no-default-names"])
    ok, _, _ = _run_main(
        ["certs", "init", str(tmp_path / "b"), "--no-default-names", "--name", "h.org"]
    )

    assert code == 2 and "--no-default-names needs" in err
    assert ok == 0
    assert _sans(tmp_path / "b" / "server.pem") == ["h.org"]


def test_certs_init_force_reissues_party_certificates_by_the_new_ca(
    tmp_path: Path,
) -> None:
    assert _run_main(["certs", "init", str(tmp_path)])[0] == 0
    for name in ("party-0", "operator"):
        assert _run_main(["certs", "issue", str(tmp_path), name])[0] == 0
    old_ca = (tmp_path / "ca.pem").read_bytes()

    refused, _, err = _run_main(["certs", "init", str(tmp_path)])
    code, out, _ = _run_main(["certs", "init", str(tmp_path), "--force"])

    assert refused == 2 and "--force" in err
    assert code == 0
    assert (tmp_path / "ca.pem").read_bytes() != old_ca
    for name in ("party-0", "operator"):
        assert f"{name}.pem" in out
        assert _signed_by(tmp_path / "parties" / f"{name}.pem", tmp_path / "ca.pem")


def test_certs_issue_force_replaces_and_error_names_the_option(tmp_path: Path) -> None:
    assert _run_main(["certs", "init", str(tmp_path)])[0] == 0
    assert _run_main(["certs", "issue", str(tmp_path), "p1"])[0] == 0
    key_before = (tmp_path / "parties" / "p1.key").read_bytes()

    again, _, err = _run_main(["certs", "issue", str(tmp_path), "p1"])
    forced, _, _ = _run_main(["certs", "issue", str(tmp_path), "p1", "--force"])

    assert again == 2 and "pass --force" in err
    assert forced == 0
    assert (tmp_path / "parties" / "p1.key").read_bytes() != key_before


# -------------------------------------------------------------- plug-in hints


def test_factory_typo_of_a_builtin_source_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'mnist:DIR'\?"):
        load_dataset("mnsit:/data")


def test_factory_unknown_module_gets_the_import_path_hint() -> None:
    with pytest.raises(ConfigError, match="PYTHONPATH=DIR"):
        load_factory("no_such_module_xyz:make", ("logreg", "mlp", "cnn"))


def test_digits_read_without_scikit_learn_equal_load_digits() -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    ref = load_digits()

    np.testing.assert_array_equal(ds.y, ref.target)
    np.testing.assert_array_equal(ds.x.reshape(-1, 64) * 16.0, ref.data)


# ------------------------------------------------------------------ reports


def _pc(pid: str) -> PartyContribution:
    return PartyContribution(pid, 0.1, 1.0, 1.0, (), ())


def _report(parties: tuple[PartyContribution, ...], rounds: tuple[Any, ...]) -> Any:
    return ContributionReport("run", "digfl-1", parties, rounds, len(rounds))


def test_party_view_prints_no_federation_fidelity_line() -> None:
    from fedgrpc.types import RoundOutcome, RoundResult

    rnd = RoundResult(0, RoundOutcome.OK, (), (), 2.0, 0.1, 1.0, 0.5, "")
    own = report_table(_report((_pc("p1"),), (rnd,)))
    everyone = report_table(_report((_pc("p1"), _pc("p2")), (rnd,)))

    assert "digfl-1 fidelity" not in own
    assert "predicted drop from p1" in own and "only party" in own
    assert "digfl-1 fidelity" in everyone


def test_report_table_top_lists_best_and_worst_with_their_ranks() -> None:
    parties = tuple(_pc(f"p{i}") for i in range(30))

    full = report_table(_report(parties, ()))
    short = report_table(_report(parties, ()), top=10)
    small = report_table(_report(parties[:21], ()), top=10)

    ranks = [int(m) for m in re.findall(r"^ *(\d+)  p\d+ ", short, flags=re.M)]
    assert ranks == [*range(1, 11), *range(21, 31)]
    assert "10 parties ranked 11-20 not shown" in short
    assert len(re.findall(r"^ *\d+  p\d+ ", full, flags=re.M)) == 30
    assert "not shown" not in full
    # 2 x 10 + 1 parties: hiding one row would save nothing.
    assert "not shown" not in small


def test_report_table_top_names_only_the_first_flagged_parties() -> None:
    parties = tuple(
        dataclasses.replace(_pc(f"p{i}"), bounded_rounds=2) for i in range(30)
    )

    short = report_table(_report(parties, ()), top=10)
    full = report_table(_report(parties, ()))

    assert "p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 and 20 more" in short
    assert ", p29" in full and "more" not in full


# ------------------------------------------------------------------- status


def test_engine_elapsed_stops_counting_when_the_run_is_done() -> None:
    clock = FakeClock()
    cfg = RoundConfig(rounds=1, min_parties=3, round_timeout_s=10.0, join_timeout_s=5.0)
    engine = RoundEngine(cfg, SPECS, THETA_0, QuadraticValidator(), clock=clock)
    for pid, n in N3.items():
        engine.join(pid, n)
    engine.tick()
    clock.advance(2.0)
    engine.stop("completed")
    at_done = engine.status().elapsed_s

    clock.advance(100.0)

    assert engine.status().state == RunState.DONE
    assert engine.status().elapsed_s == at_done == pytest.approx(2.0)


# ------------------------------------------------------------ progress, json


def test_eta_text_from_the_mean_time_per_item() -> None:
    from fedgrpc.cli.shapley import eta_text

    assert eta_text(0, 63, 2.0) == " 2 s"
    assert eta_text(12, 63, 12.0) == " 12 s, ETA 51 s"
    assert eta_text(63, 63, 63.04) == " in 63.0 s"


def test_progress_bar_with_elapsed_shows_eta() -> None:
    from fedgrpc.cli.shapley import progress_bar

    out = io.StringIO()

    progress_bar(1, 4, stream=out, force=True, width=4, elapsed_s=3.0)

    assert out.getvalue() == "\r[#...] 1/4 coalitions 3 s, ETA 9 s"


def test_json_output_of_split_certs_and_parties(tmp_path: Path) -> None:
    import json

    split = _run_main(
        ["split", "--parties", "2", "--out", str(tmp_path / "s"), "--format", "json"]
    )
    init = _run_main(["certs", "init", str(tmp_path / "pki"), "--format", "json"])
    issue = _run_main(
        ["certs", "issue", str(tmp_path / "pki"), "p1", "--format", "json"]
    )
    add = _run_main(
        ["parties", "add", str(tmp_path / "t.toml"), "p1", "--format", "json"]
    )

    doc = json.loads(split[1])
    assert [p["party_id"] for p in doc["parties"]] == ["party-0", "party-1"]
    assert doc["validation"]["samples"] == 359
    assert json.loads(init[1])["server_names"] == ["localhost", "127.0.0.1", "::1"]
    assert Path(json.loads(issue[1])["cert"]).name == "p1.pem"
    added = json.loads(add[1])
    assert added["id"] == "p1" and len(added["token"]) > 20
