"""A validation-data factory that waits for a file: start-up made slow on purpose.

``fedgrpc serve --val-data tests.e2e.gated_data:digits`` loads digits only once the file
named by ``FEDGRPC_TEST_GATE`` exists, so a test can look at the aggregator while its
validation worker is still setting up; ``tests.e2e.gated_data:broken`` always fails.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from fedgrpc.datasets.sources import Dataset, load_dataset, subset

GATE_ENV = "FEDGRPC_TEST_GATE"
GATE_WAIT_S = 120.0


def digits() -> Dataset:
    """The first 200 digits, once the gate file exists (at most GATE_WAIT_S)."""
    gate = Path(os.environ[GATE_ENV])
    end = time.monotonic() + GATE_WAIT_S
    while not gate.exists() and time.monotonic() < end:
        time.sleep(0.02)
    ds = load_dataset("digits")
    return subset(ds, np.arange(200))


def broken() -> Dataset:
    """A data set that cannot be loaded."""
    raise RuntimeError("the validation share is not mounted")
