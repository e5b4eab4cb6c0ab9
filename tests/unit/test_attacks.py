from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from fedgrpc.datasets.attacks import (
    Attack,
    apply_data_attack,
    apply_update_attack,
    parse_assignments,
    parse_attack,
)
from fedgrpc.errors import ConfigError


def _data(
    n: int = 200, seed: int = 0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 4, 4), dtype=np.float32)
    y = rng.integers(0, 10, size=n)
    return x, y


def _update() -> dict[str, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(1)
    return {
        "w": rng.standard_normal((20, 30)).astype(np.float32),
        "b": rng.standard_normal(30).astype(np.float32),
    }


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("label-flip:0.6", Attack("label-flip", (0.6,), "label-flip:0.6")),
        ("mix:6->2:0.5", Attack("mix", (6.0, 2.0, 0.5), "mix:6->2:0.5")),
        ("random-labels", Attack("random-labels", (), "random-labels")),
        ("free-rider", Attack("free-rider", (), "free-rider")),
        ("scale:-3", Attack("scale", (-3.0,), "scale:-3")),
        (" noise:0.1 ", Attack("noise", (0.1,), "noise:0.1")),
    ],
)
def test_parse_attack_valid(spec: str, expected: Attack) -> None:
    assert parse_attack(spec) == expected


@pytest.mark.parametrize("spec", ["", "none", "  "])
def test_parse_attack_none(spec: str) -> None:
    assert parse_attack(spec) is None


@pytest.mark.parametrize(
    "spec",
    [
        "label-flip",
        "label-flip:1.5",
        "label-flip:x",
        "mix:6:0.5",
        "mix:6->2",
        "mix:a->2:0.5",
        "mix:6->-1:0.5",
        "mix:6->2:2",
        "random-labels:3",
        "scale:inf",
        "noise:-1",
        "sybil",
    ],
)
def test_parse_attack_bad_spec_raises(spec: str) -> None:
    with pytest.raises(
        ConfigError, match=f"bad attack '{spec}'.*expected .*label-flip"
    ):
        parse_attack(spec)


def test_attack_on_data_flag() -> None:
    assert parse_attack("label-flip:0.1").on_data  # type: ignore[union-attr]
    assert not parse_attack("scale:2").on_data  # type: ignore[union-attr]


def test_apply_data_attack_label_flip_rate() -> None:
    x, y = _data(200)

    x2, y2 = apply_data_attack(
        parse_attack("label-flip:0.6"), x, y, 10, np.random.default_rng(0)
    )

    changed = y2 != y
    assert changed.sum() == 120
    np.testing.assert_array_equal(y2[changed], 9 - y[changed])
    np.testing.assert_array_equal(x2, x)
    assert x2 is not x and y2 is not y


def test_apply_data_attack_label_flip_deterministic() -> None:
    x, y = _data()
    attack = parse_attack("label-flip:0.3")

    _, a = apply_data_attack(attack, x, y, 10, np.random.default_rng(4))
    _, b = apply_data_attack(attack, x, y, 10, np.random.default_rng(4))
    _, c = apply_data_attack(attack, x, y, 10, np.random.default_rng(5))

    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_apply_data_attack_mix_blends_only_destination() -> None:
    x, y = _data(300)
    x_before = x.copy()

    x2, y2 = apply_data_attack(
        parse_attack("mix:6->2:0.25"), x, y, 10, np.random.default_rng(0)
    )

    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y2, y)
    others = y != 2
    np.testing.assert_array_equal(x2[others], x[others])
    sixes = x[y == 6]
    for blended, original in zip(x2[y == 2], x[y == 2], strict=True):
        donor = (blended - 0.75 * original) / 0.25
        assert np.min(np.abs(sixes - donor).max(axis=(1, 2, 3))) < 1e-5


def test_apply_data_attack_mix_class_out_of_range_raises() -> None:
    x, y = _data()

    with pytest.raises(ConfigError, match="class 12 outside"):
        apply_data_attack(
            parse_attack("mix:12->2:0.5"), x, y, 10, np.random.default_rng(0)
        )


def test_apply_data_attack_mix_without_source_class_keeps_data() -> None:
    x, y = _data()
    y = np.where(y == 6, 0, y)

    x2, _ = apply_data_attack(
        parse_attack("mix:6->2:0.5"), x, y, 10, np.random.default_rng(0)
    )

    np.testing.assert_array_equal(x2, x)


def test_apply_data_attack_random_labels_in_range() -> None:
    x, y = _data(500)

    _, y2 = apply_data_attack(
        parse_attack("random-labels"), x, y, 10, np.random.default_rng(0)
    )

    assert y2.dtype == np.int64
    assert y2.min() >= 0 and y2.max() <= 9
    assert 0.8 < (y2 != y).mean() < 0.98


@pytest.mark.parametrize("spec", ["", "free-rider", "scale:2", "noise:1"])
def test_apply_data_attack_identity_for_update_attacks(spec: str) -> None:
    x, y = _data()

    x2, y2 = apply_data_attack(parse_attack(spec), x, y, 10, np.random.default_rng(0))

    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def test_apply_update_attack_free_rider_zeros() -> None:
    update = _update()

    out = apply_update_attack(
        parse_attack("free-rider"), update, np.random.default_rng(0)
    )

    assert list(out) == ["w", "b"]
    for name, a in out.items():
        assert a.shape == update[name].shape and a.dtype == np.float32
        assert not a.any()


def test_apply_update_attack_scale() -> None:
    update = _update()

    out = apply_update_attack(
        parse_attack("scale:-2.5"), update, np.random.default_rng(0)
    )

    for name, a in out.items():
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, -2.5 * update[name], rtol=1e-6)


def test_apply_update_attack_noise_statistics_and_determinism() -> None:
    update = _update()
    attack = parse_attack("noise:0.5")

    out = apply_update_attack(attack, update, np.random.default_rng(3))
    again = apply_update_attack(attack, update, np.random.default_rng(3))

    noise = out["w"] - update["w"]
    assert out["w"].dtype == np.float32
    assert abs(noise.mean()) < 0.05
    assert 0.45 < noise.std() < 0.55
    np.testing.assert_array_equal(out["b"], again["b"])


@pytest.mark.parametrize("spec", ["", "label-flip:0.5", "mix:1->2:0.5"])
def test_apply_update_attack_identity_for_data_attacks(spec: str) -> None:
    update = _update()

    out = apply_update_attack(parse_attack(spec), update, np.random.default_rng(0))

    assert out == update


def test_parse_assignments_keys_and_none() -> None:
    out = parse_assignments(["3=label-flip:0.6", "p7 = free-rider", "2=none"])

    assert out == {
        "3": Attack("label-flip", (0.6,), "label-flip:0.6"),
        "p7": Attack("free-rider", (), "free-rider"),
    }


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["label-flip:0.6"], "expected PARTY=ATTACK"),
        (["=scale:2"], "expected PARTY=ATTACK"),
        (["1=scale:2", "1=noise:1"], "given twice"),
        (["1=scale"], "bad attack 'scale'"),
    ],
)
def test_parse_assignments_bad_items_raise(items: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_assignments(items)
