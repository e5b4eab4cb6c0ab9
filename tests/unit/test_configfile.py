"""``--config FILE`` and ``fedgrpc config show``."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from fedgrpc.cli.main import main, parse_args
from fedgrpc.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_config_file_sets_options_and_flags_override(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path,
        'rounds = 7\nupdate-kind = "gradient"\nserver_lr = 1\n'
        'attack = ["1=free-rider"]\nrun-dir = "x"\n',
    )

    a = parse_args(["simulate", "--config", str(cfg), "--rounds", "9"])

    assert a.rounds == 9  # flag beats file
    assert a.update_kind == "gradient"
    assert a.server_lr == 1.0 and isinstance(a.server_lr, float)
    assert a.attack == ["1=free-rider"]
    assert a.run_dir == Path("x")
    assert parse_args(["simulate"]).rounds == 15  # no file: the default


def test_config_file_repeatable_option_on_the_command_line_replaces_the_file(
    tmp_path: Path,
) -> None:
    cfg = _write(tmp_path, 'attack = ["1=free-rider"]\n')

    a = parse_args(["simulate", "--config", str(cfg), "--attack", "2=scale:5"])

    assert a.attack == ["2=scale:5"]


def test_config_file_gives_required_options_and_switches(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path,
        'server = "localhost:1"\nparty-id = "p1"\ndata = "digits"\ninsecure = true\n',
    )

    a = parse_args(["client", f"--config={cfg}"])

    assert (a.server, a.party_id, a.data, a.insecure) == (
        "localhost:1",
        "p1",
        "digits",
        True,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("roundz = 3\n", "unknown key 'roundz'"),
        ('rounds = "x"\n', "key 'rounds': expected an integer"),
        ("rounds = 2.5\n", "key 'rounds': expected an integer"),
        ('update-kind = "sideways"\n', "'sideways' is not one of gradient, delta"),
        ('insecure = "yes"\n', "switch"),
        ("config = 1\n", "unknown key 'config'"),
        ("rounds = \n", "not valid TOML"),
    ],
)
def test_config_file_errors_name_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    cfg = _write(tmp_path, text)

    with pytest.raises(ConfigError, match=message):
        parse_args(["serve", "--config", str(cfg)])


def test_config_file_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_args(["serve", "--config", str(tmp_path / "nope.toml")])


def _show(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["config", "show", *argv])
    return code, out.getvalue()


def test_config_show_names_the_source_of_every_value(tmp_path: Path) -> None:
    cfg = _write(tmp_path, 'rounds = 7\nlr = 0.2\ntls-cert = "s.pem"\n')

    code, out = _show(["serve", "--config", str(cfg), "--lr", "0.3"])

    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if "=" in line}
    assert lines["rounds"].endswith(f"= 7  # config {cfg}")
    assert lines["lr"].endswith("= 0.3  # command line")
    assert lines["tls-cert"].endswith(f'= "s.pem"  # config {cfg}')
    assert lines["min-parties"].endswith("= 2  # default")
    assert "# tls-key" in out and "(not set)" in out


def test_config_show_output_is_a_config_file(tmp_path: Path) -> None:
    cfg = _write(tmp_path, 'rounds = 7\nattack = ["3=label-flip:0.6"]\n')
    code, out = _show(["simulate", "--config", str(cfg)])
    again = tmp_path / "again.toml"
    again.write_text(out)

    a = parse_args(["simulate", "--config", str(again)])
    b = parse_args(["simulate", "--config", str(cfg)])

    assert code == 0
    assert vars(a) == {**vars(b), "config": again}


def test_config_show_json(tmp_path: Path) -> None:
    code, out = _show(["--format", "json", "client", "--server", "h:1"])

    doc = json.loads(out)
    assert code == 0
    assert doc["server"] == {"value": "h:1", "source": "command line"}
    assert doc["rpc-timeout"]["source"] == "default"
