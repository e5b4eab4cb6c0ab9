"""``python -m fedgrpc``."""

from fedgrpc.cli import main

raise SystemExit(main())
