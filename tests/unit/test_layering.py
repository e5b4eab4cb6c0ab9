"""The package's architecture, enforced: which part may import which (STYLE.md).

Every module of the package is parsed (AST) and every import it makes, at module level,
inside functions or under TYPE_CHECKING, is checked against the allowed dependencies of
its part. A second check runs in a fresh interpreter: importing each part pulls in
neither grpc nor torch where the rules forbid them.
"""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "fedgrpc"

GROUND = {"fedgrpc", "types", "errors", "config", "factories", "layout"}
"""The ground floor: pure domain types, errors, config, import strings, flat layout."""

# part -> the parts it may import (itself always). "grpc" and "torch" stand for the
# third-party packages; "proto" for fedgrpc/proto (generated).
ALLOWED: dict[str, set[str]] = {
    "ground": set(),
    "scoring": {"ground"},
    "strategies": {"ground"},
    "engine": {"ground", "scoring", "strategies"},
    "wire": {"ground", "proto"},
    "store": {"ground", "scoring"},
    "datasets": {"ground", "store"},
    "security": {"ground", "store"},
    "learning": {
        "ground", "engine", "scoring", "strategies", "store", "datasets", "torch",
    },
    "server": {
        "ground", "engine", "scoring", "strategies", "store", "wire", "security",
        "learning", "proto", "grpc",
    },
    "client": {
        "ground", "store", "wire", "security", "learning", "datasets", "proto", "grpc",
        "ray",
    },
    "cli": {
        "ground", "engine", "scoring", "strategies", "store", "datasets", "learning",
        "security", "server", "client",
    },
    "proto": {"proto", "grpc"},
    "main": {"cli"},
}  # fmt: skip
THIRD_PARTY = {
    "grpc": "grpc",
    "grpc_health": "grpc",
    "grpc_reflection": "grpc",
    "grpc_tools": "grpc",
    "google": "proto",  # protobuf runtime: only next to the generated code
    "torch": "torch",
    "ray": "ray",  # optional: only the client's Ray pool (simulate --backend ray)
}


def part_of(module: str) -> str:
    """The part a fedgrpc module belongs to."""
    parts = module.split(".")
    if parts[0] != "fedgrpc":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in GROUND:
        return "ground"
    if parts[1] == "__main__":
        return "main"
    return parts[1]


def modules() -> Iterator[tuple[str, Path]]:
    """(dotted name, path) of every module of the package, generated code included."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        names = list(rel.parts)
        if names[-1] == "__init__":
            names.pop()
        yield ".".join(names), path


def imports_of(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports, anywhere in its source (absolute names)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.add(mod)
            # ``from fedgrpc import wire`` imports the module fedgrpc.wire.
            if mod.split(".")[0] == "fedgrpc":
                for a in node.names:
                    sub = PACKAGE.parent / mod.replace(".", "/") / a.name
                    if sub.is_dir() or sub.with_suffix(".py").is_file():
                        found.add(f"{mod}.{a.name}")
    return found


GRAPH = {name: imports_of(name, path) for name, path in modules()}


def _target(imported: str) -> str | None:
    """The part (or third-party stand-in) an imported name belongs to."""
    if imported == "fedgrpc.proto" or imported.startswith("fedgrpc.proto."):
        return "proto"
    if imported.split(".")[0] == "fedgrpc":
        return part_of(imported)
    return THIRD_PARTY.get(imported.split(".")[0])


def test_layering_walks_every_module() -> None:
    names = set(GRAPH)

    assert len(names) > 50
    assert {
        "fedgrpc.engine.rounds",
        "fedgrpc.wire.messages",
        "fedgrpc.cli.main",
        "fedgrpc.learning.worker",
    } <= names
    assert "fedgrpc.wire" in GRAPH["fedgrpc.server.servicer"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_layering_imports_only_allowed_parts(module: str) -> None:
    part = part_of(module) if not module.startswith("fedgrpc.proto") else "proto"
    allowed = ALLOWED[part] | {part}

    bad = sorted(
        f"{imported} ({target})"
        for imported in GRAPH[module]
        if (target := _target(imported)) is not None and target not in allowed
    )

    assert bad == [], f"{module} ({part}) may not import {bad}"


def test_layering_rules_catch_a_forbidden_import() -> None:
    # The checker itself must fail on what it forbids.
    assert _target("fedgrpc.server.app") == "server"
    assert "server" not in ALLOWED["client"]
    assert "torch" not in ALLOWED["engine"] | ALLOWED["server"] | ALLOWED["cli"]
    assert "grpc" not in ALLOWED["cli"] | ALLOWED["store"] | ALLOWED["wire"]
    assert "ray" not in ALLOWED["cli"] | ALLOWED["server"] | ALLOWED["engine"]
    assert _target("ray.exceptions") == "ray"
    assert _target("grpc_health.v1") == "grpc"
    assert _target("google.protobuf.json_format") == "proto"


def test_layering_no_import_cycles() -> None:
    inside = {
        name: {m for m in deps if m in GRAPH and m != name}
        for name, deps in GRAPH.items()
    }
    # A package imports its own submodules through __init__; that is no cycle.
    for name, deps in inside.items():
        inside[name] = {d for d in deps if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(inside[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(inside):
        if node not in state:
            visit(node)

    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# Each part imported alone in a fresh interpreter: what it pulls in at run time.
_PROBE = r"""
import importlib, json, sys
importlib.import_module(sys.argv[1])
heavy = ("torch", "grpc", "sklearn", "matplotlib")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""

TORCH_FREE = (
    "fedgrpc.engine",
    "fedgrpc.scoring.digfl",
    "fedgrpc.scoring.shapley",
    "fedgrpc.wire",
    "fedgrpc.store.ledger",
    "fedgrpc.store.run_dir",
    "fedgrpc.datasets.split",
    "fedgrpc.security.pki",
    "fedgrpc.security.registry",
    "fedgrpc.server.app",
    "fedgrpc.client.stub",
    "fedgrpc.client.raypool",  # the driver side; its actors import torch
    "fedgrpc.cli.main",
    "fedgrpc.learning.worker",
)
GRPC_FREE = {
    "fedgrpc.engine",
    "fedgrpc.scoring.digfl",
    "fedgrpc.scoring.shapley",
    "fedgrpc.store.ledger",
    "fedgrpc.store.run_dir",
    "fedgrpc.datasets.split",
    "fedgrpc.security.pki",
    "fedgrpc.security.registry",
    "fedgrpc.cli.main",
    "fedgrpc.learning.worker",
    "fedgrpc.wire",
}


@pytest.mark.parametrize("module", TORCH_FREE)
def test_layering_import_loads_no_torch(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    loaded = json.loads(out)

    assert "torch" not in loaded
    assert "matplotlib" not in loaded
    if module in GRPC_FREE:
        assert "grpc" not in loaded


def test_layering_probe_sees_torch_where_it_is() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "fedgrpc.learning.training"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout

    assert "torch" in json.loads(out)


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
