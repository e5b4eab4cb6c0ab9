"""``python -m fedgrpc``."""

from fedgrpc.cli.main import main

raise SystemExit(main())
