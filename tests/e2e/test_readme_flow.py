"""The README's "Running parties on separate machines" flow, run as written.

The commands are read from README.md (between the ``readme-flow`` markers), not
copied here, so the README cannot drift from what works. The only adaptations are
the ones a single test machine forces: the aggregator listens on ``localhost:0``
(with ``--port-file``) instead of port 50051, parties reach it as ``localhost:PORT``
(its certificate also names localhost: ``certs init --name`` adds to the defaults),
and each party runs in its own directory holding the files the README says to ship.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.helpers import ENV, processes, read_port, wait_exit, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]
PUBLIC = "aggregator.example.org:50051"
N_PARTIES = 6


def readme_steps() -> list[str]:
    """The shell commands of the README flow: one entry per logical command.

    Continuation lines are joined; a here-document and a ``for`` loop stay one step.
    """
    text = (REPO / "README.md").read_text()
    m = re.search(
        r"<!-- readme-flow:begin.*?-->(.*)<!-- readme-flow:end -->", text, re.S
    )
    assert m, "README.md lost its readme-flow markers"
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", m.group(1), re.S):
        lines += block.splitlines()
    steps: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        step = line
        while step.endswith("\\"):
            step = step[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<'(\w+)'", step)
        if heredoc:
            while lines[i] != heredoc.group(1):
                step += "\n" + lines[i]
                i += 1
            step += "\n" + lines[i]
            i += 1
        elif step.startswith("for "):
            while not lines[i - 1].startswith("done"):
                step += "\n" + lines[i]
                i += 1
        steps.append(step)
    return steps


def _bash(step: str, cwd: Path, timeout_s: float = 120) -> str:
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", step],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert res.returncode == 0, f"README step failed: {step}\n{res.stdout}{res.stderr}"
    return res.stdout


def _background(step: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(
            ["bash", "-c", f"exec {step}"],
            cwd=cwd,
            env=ENV,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _ship(work: Path, i: int) -> Path:
    """A party's machine: the files the README says to ship to party-i."""
    home = work / f"party-{i}-machine"
    home.mkdir()
    shutil.copy(work / "pki" / "ca.pem", home / "ca.pem")
    for ext in ("pem", "key"):
        shutil.copy(
            work / "pki" / "parties" / f"party-{i}.{ext}", home / f"party-{i}.{ext}"
        )
    shutil.copy(work / "split" / f"party-{i}.npz", home / f"party-{i}.npz")
    return home


def test_readme_separate_machines_flow_works_as_written(tmp_path: Path) -> None:
    steps = readme_steps()
    kinds = [s.split()[1] if s.startswith("fedgrpc ") else s.split()[0] for s in steps]
    assert kinds.count("serve") == 1 and kinds.count("client") == 1, kinds
    work = tmp_path
    port_file = work / "port"
    client_step = ""
    with processes() as procs:
        server: subprocess.Popen[bytes] | None = None
        port = 0
        for step in steps:
            if step.startswith("fedgrpc serve"):
                assert "--address [::]:50051" in step
                cmd = step.replace(
                    "--address [::]:50051",
                    f"--address localhost:0 --port-file {port_file}",
                )
                server = _background(cmd, work, work / "serve.log")
                procs.procs.append(server)
                port = read_port(port_file, server, work / "serve.log")
            elif step.startswith("fedgrpc client"):
                assert server is not None and PUBLIC in step
                clients = []
                for i in range(N_PARTIES):
                    cmd = step.replace(PUBLIC, f"localhost:{port}").replace(
                        "party-0", f"party-{i}"
                    )
                    home = _ship(work, i)
                    c = _background(cmd, home, home / "client.log")
                    procs.procs.append(c)
                    clients.append((c, home / "client.log"))
                for c, log in clients:
                    assert wait_exit(c, 240, log) == 0, log.read_text()[-3000:]
                client_step = step
            elif step.startswith("fedgrpc contributions --server"):
                # After the last round: the grace period keeps the aggregator up.
                assert server is not None and server.poll() is None
                out = _bash(step.replace(PUBLIC, f"localhost:{port}"), work)
                for i in range(N_PARTIES):
                    assert f"party-{i}" in out
                assert "30 rounds recorded" in out
            else:
                out = _bash(step, work)
                if step.startswith("fedgrpc contributions --run-dir"):
                    rows = out.strip().splitlines()
                    assert rows[0].startswith("round,party_id,score")
                    assert len(rows) == 1 + 30 * N_PARTIES
                    assert rows[1].startswith("0,party-0,")  # rounds from 0
        assert server is not None
        assert (work / "contrib.png").read_bytes()[:4] == b"\x89PNG"

        # A party that reconnects during the grace period is told training is done.
        home0 = work / "party-0-machine"
        again = _bash(client_step.replace(PUBLIC, f"localhost:{port}"), home0, 60)
        result = json.loads(again.strip().splitlines()[-1])
        assert result["reason"] == "completed" and result["rounds_submitted"] == 0

        # SIGTERM ends the grace period: a completed run still exits 0.
        server.send_signal(signal.SIGTERM)
        assert wait_exit(server, 30, work / "serve.log") == 0

        # Resuming the finished run serves (status, done) instead of exiting at once.
        serve_step = next(s for s in steps if s.startswith("fedgrpc serve"))
        port_file.unlink()
        resumed_cmd = serve_step.replace(
            "--address [::]:50051", f"--address localhost:0 --port-file {port_file}"
        ).replace("--run-dir runs/digits", "--resume runs/digits")
        resumed = _background(resumed_cmd, work, work / "resumed.log")
        procs.procs.append(resumed)
        port = read_port(port_file, resumed, work / "resumed.log")
        status_cmd = (
            f"fedgrpc status --server localhost:{port} --tls-ca pki/ca.pem "
            "--tls-cert pki/parties/operator.pem --tls-key pki/parties/operator.key "
            "--format json"
        )
        wait_for(
            lambda: json.loads(_bash(status_cmd, work))["state"] == "done",
            60,
            "the resumed finished run to answer status",
            poll_s=0.5,
        )
        again = _bash(client_step.replace(PUBLIC, f"localhost:{port}"), home0, 60)
        assert json.loads(again.strip().splitlines()[-1])["reason"] == "completed"
        time.sleep(1.0)
        assert resumed.poll() is None, "a resumed finished run must keep serving"
        resumed.send_signal(signal.SIGTERM)
        assert wait_exit(resumed, 30, work / "resumed.log") == 0
