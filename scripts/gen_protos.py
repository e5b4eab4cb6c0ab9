"""Regenerate fedgrpc/proto from protos/ (checked in; CI fails when it drifts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)  # only --help
    protos = sorted(
        str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto")
    )
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
    return int(rc)


if __name__ == "__main__":
    raise SystemExit(main())
