from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "fedgrpc"

PURE_MODULES = (
    "fedgrpc.types",
    "fedgrpc.config",
    "fedgrpc.errors",
    "fedgrpc.engine",
    "fedgrpc.contribution",
    "fedgrpc.ledger",
    "fedgrpc.checkpoint",
    "fedgrpc.models",
    "fedgrpc.training",
    "fedgrpc.runtime",
    "fedgrpc.datasets",
    "fedgrpc.datasets.sources",
    "fedgrpc.datasets.partition",
    "fedgrpc.datasets.attacks",
    "fedgrpc.layout",
    "fedgrpc.evaluation",
)

# Heavy third-party imports happen once in the parent; each module is then imported in a
# forked child, so every module is judged on its own import closure.
_PROBE = r"""
import importlib, json, os, sys
import numpy, torch  # noqa: F401  (pre-loaded: neither imports grpc)

def forbidden():
    return sorted(
        m for m in sys.modules
        if m == "grpc" or m.startswith("grpc.")
        or m == "fedgrpc.proto" or m.startswith("fedgrpc.proto.")
    )

results = {"<parent>": {"forbidden": forbidden()}}
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            res = {"forbidden": forbidden()}
        except BaseException as err:
            res = {"error": repr(err)}
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    results[name] = json.loads(data)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def imports() -> dict[str, dict[str, list[str] | str]]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *PURE_MODULES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results: dict[str, dict[str, list[str] | str]] = json.loads(proc.stdout)
    assert results.pop("<parent>") == {"forbidden": []}
    return results


def _loaded(imports: dict[str, dict[str, list[str] | str]], module: str) -> list[str]:
    res = imports[module]
    assert "error" not in res, f"importing {module} failed: {res['error']}"
    forbidden = res["forbidden"]
    assert isinstance(forbidden, list)
    return forbidden


@pytest.mark.parametrize("module", PURE_MODULES)
def test_layering_pure_module_does_not_load_grpc(
    imports: dict[str, dict[str, list[str] | str]], module: str
) -> None:
    loaded = _loaded(imports, module)

    grpc = [m for m in loaded if m == "grpc" or m.startswith("grpc.")]
    assert grpc == [], f"{module} loads {grpc}"


@pytest.mark.parametrize("module", PURE_MODULES)
def test_layering_pure_module_does_not_load_proto(
    imports: dict[str, dict[str, list[str] | str]], module: str
) -> None:
    loaded = _loaded(imports, module)

    proto = [m for m in loaded if m.startswith("fedgrpc.proto")]
    assert proto == [], f"{module} loads {proto}"


# ------------------------------------------------------------------ no pickle etc.

# Applied to code with comments and string literals blanked out, so docstrings and
# "# Never allow_pickle" warnings pass. ``model.eval()`` (torch) is a method, not eval.
BANNED = {
    "pickle": re.compile(r"\bpickle\b"),
    "eval(": re.compile(r"(?<!\.)\beval\("),
    "exec(": re.compile(r"(?<!\.)\bexec\("),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "marshal/shelve/dill": re.compile(r"\b(marshal|shelve|dill|cloudpickle)\b"),
}


def _code_only(source: str) -> list[str]:
    """Source lines with every comment and string literal replaced by spaces."""
    lines = source.splitlines()
    chars = [list(line) for line in lines]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for row in range(r0, r1 + 1):
            line = chars[row - 1]
            start = c0 if row == r0 else 0
            stop = c1 if row == r1 else len(line)
            line[start:stop] = " " * (stop - start)
    return ["".join(c) for c in chars]


def _offenders(path: Path, source: str) -> list[str]:
    found = []
    for lineno, line in enumerate(_code_only(source), start=1):
        for label, pattern in BANNED.items():
            if pattern.search(line):
                found.append(
                    f"{path}:{lineno}: {label}: {source.splitlines()[lineno - 1]}"
                )
    return found


def test_layering_scanner_flags_code_and_skips_comments() -> None:
    source = (
        '"""Never pickle: docstring mention."""\n'
        "import pickle\n"
        "x = eval(s)  # eval( in a comment\n"
        "exec(code)\n"
        "np.load(f, allow_pickle = True)\n"
        "# Never allow_pickle=True: this file may come from a peer.\n"
        "msg = 'allow_pickle=True and pickle.loads(eval('\n"
        "model.eval()\n"
        "np.load(f, allow_pickle=False)\n"
    )

    found = _offenders(Path("x.py"), source)

    assert [f.split(": ")[1] for f in found] == [
        "pickle",
        "eval(",
        "exec(",
        "allow_pickle=True",
    ]
    assert [f.split(":")[1] for f in found] == ["2", "3", "4", "5"]


def test_layering_no_pickle_eval_exec_in_package() -> None:
    files = [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "proto" not in p.relative_to(PACKAGE).parts
    ]
    assert len(files) > 10

    offenders = [
        o for p in files for o in _offenders(p.relative_to(REPO), p.read_text())
    ]

    assert offenders == [], "\n".join(offenders)
