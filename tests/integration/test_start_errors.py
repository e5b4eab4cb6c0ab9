"""Start-up errors are one clean line and exit 2, and never block the retry.

Issue 11 items 9-12: damaged ledgers, IDX headers that overflow, busy or invalid
ports, bad ``--init-model`` values, failed starts that left a run directory behind,
and orphan temp files of interrupted writes.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from fedgrpc.cli.main import main
from fedgrpc.client.party import run_party
from fedgrpc.config import ServerConfig
from fedgrpc.datasets.sources import Dataset, load_dataset, read_idx, subset
from fedgrpc.errors import ConfigError
from fedgrpc.store.checkpoint import save_arrays
from tests.conftest import MakeServer, client_config
from tests.integration.test_service import StubFor, _state

pytestmark = pytest.mark.integration


def _serve(run_dir: Path, *extra: str) -> list[str]:
    return [
        "serve",
        "--insecure",
        "--validator",
        "thread",
        "--address",
        "localhost:0",
        "--run-dir",
        str(run_dir),
        "--join-timeout",
        "1",
        *(extra or ("--val-data", "digits")),
    ]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("fedgrpc serve: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_garbage_ledger_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "ledger.sqlite").write_bytes(np.random.default_rng(0).bytes(8192))

    code = main(
        ["serve", "--insecure", "--validator", "thread", "--address", "localhost:0",
         "--resume", str(run)]
    )  # fmt: skip

    assert code == 2
    assert "is not a readable fedgrpc ledger" in _error_line(capsys)


def test_truncated_ledger_is_a_clean_error(
    make_server: MakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    agg = make_server(run_dir=run, rounds=1)
    agg.shutdown(grace_s=0.1, save_open_round=False)
    ledger = run / "ledger.sqlite"
    ledger.write_bytes(ledger.read_bytes()[:6000])

    code = main(
        [
            "serve",
            "--insecure",
            "--validator",
            "thread",
            "--address",
            "localhost:0",
            "--resume",
            str(run),
        ]
    )

    assert code == 2
    line = _error_line(capsys)
    assert "ledger.sqlite" in line
    assert "damaged" in line or "not a readable fedgrpc ledger" in line


def test_idx_header_whose_dimensions_overflow_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    dims = (0x80000000, 0x80000000, 4)  # 2**64 elements: int64 would wrap to 0
    path.write_bytes(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in dims))

    with pytest.raises(ConfigError, match="expected 18446744073709551616"):
        read_idx(path, ndim=3)


def test_busy_port_is_a_clean_error_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = _serve(tmp_path / "run")
        args[args.index("localhost:0")] = f"127.0.0.1:{port}"

        code = main(args)

    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in _error_line(
        capsys
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("address", ["localhost:99999", "localhost:http", "nohost"])
def test_invalid_address_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="address"):
        ServerConfig(insecure=True, address=address)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (np.nan, "non-finite"),
        (np.inf, "non-finite"),
        (1e300, "non-finite"),
        (1 + 2j, "dtype complex128"),
    ],
)
def test_init_model_with_bad_values_is_refused_at_start(
    make_server: MakeServer, tmp_path: Path, value: complex, needle: str
) -> None:
    bias = np.zeros(10, dtype=np.complex128 if isinstance(value, complex) else None)
    bias[3] = value
    path = tmp_path / "init.npz"
    save_arrays(path, {"fc.weight": np.zeros((10, 64), np.float32), "fc.bias": bias})

    with pytest.raises(ConfigError) as info:
        make_server(server={"init_model": path})

    assert "tensor 'fc.bias'" in str(info.value) and needle in str(info.value)


def test_failed_start_does_not_block_the_corrected_command(
    make_server: MakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"

    code = main([*_serve(run), "--val-data", f"npz:{tmp_path / 'missing.npz'}"])
    line = _error_line(capsys)
    agg = make_server(run_dir=run, rounds=1)  # the same --run-dir, corrected

    assert code == 2 and "missing.npz" in line
    assert agg.ledger.run_info() is not None


def test_serve_without_val_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _serve(tmp_path / "run", "--rounds", "1")  # no --val-data

    code = main(args)

    assert code == 2
    assert "no validation data: pass --val-data" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_orphan_temp_files_are_removed_at_resume(
    make_server: MakeServer, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    make_server(run_dir=run, rounds=2).shutdown(grace_s=0.1, save_open_round=False)
    orphans = [
        run / "checkpoints" / ".round-000001.npz.k3j2x.tmp",
        run / ".summary.json.a8f0.tmp",
    ]
    for o in orphans:
        o.write_bytes(b"half a file")
    keep = run / "notes.tmp"  # not ours: no leading dot
    keep.write_text("operator's file")

    make_server(run_dir=run, server={"resume": True}, rounds=2)

    assert [o.exists() for o in orphans] == [False, False]
    assert keep.exists()


@pytest.mark.parametrize("what", ["shape", "labels"])
def test_party_whose_data_does_not_fit_is_refused_before_joining(
    make_server: MakeServer, stub_for: StubFor, what: str
) -> None:
    agg = make_server(rounds=1, min_parties=2)
    digits = subset(load_dataset("digits"), np.arange(50))
    if what == "shape":
        bad = Dataset(
            digits.x.reshape(50, 1, 4, 16), digits.y, digits.num_classes, "bad"
        )
        needle = (
            "local samples have shape [1, 4, 16]; the run's model expects [1, 8, 8]"
        )
    else:
        bad = Dataset(digits.x, digits.y + 5, digits.num_classes + 5, "bad")
        needle = "local labels range over [5, 14]; the run's model has 10 classes"

    with pytest.raises(ConfigError) as info:
        run_party(client_config(agg, "alice"), bad)

    assert needle in str(info.value)
    assert list(_state(stub_for(agg)).joined) == []  # the run never waits for it
