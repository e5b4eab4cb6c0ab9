"""`--init-model FILE.npz` starts a run from given weights; bad files are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedgrpc.errors import ConfigError
from fedgrpc.store.checkpoint import save_arrays
from tests.conftest import MakeServer

pytestmark = pytest.mark.integration


def test_init_model_starts_run_from_given_weights(
    make_server: MakeServer, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    weights = {
        "fc.weight": rng.standard_normal((10, 64)).astype(np.float32),
        "fc.bias": rng.standard_normal(10).astype(np.float32),
    }
    path = tmp_path / "init.npz"
    save_arrays(path, weights)

    agg = make_server(server={"init_model": path})

    views = agg.layout.views(agg.engine.theta)
    for name, want in weights.items():
        np.testing.assert_array_equal(views[name], want)
    latest = agg.broadcaster.latest
    assert latest is None or latest.round == 0


def test_init_model_with_wrong_shapes_is_refused(
    make_server: MakeServer, tmp_path: Path
) -> None:
    path = tmp_path / "bad.npz"
    save_arrays(
        path,
        {
            "fc.weight": np.zeros((3, 3), np.float32),
            "fc.bias": np.zeros(10, np.float32),
        },
    )

    with pytest.raises(ConfigError, match=r"--init-model .*bad\.npz.*fc\.weight"):
        make_server(server={"init_model": path})
