"""Simulated low-value parties (evaluation only): poisoned data or tampered updates.

An attack is a spec string recorded with the run, so an evaluation can be reproduced:

- ``label-flip:RATE``: a fraction RATE of the samples get label ``C - 1 - y``.
- ``mix:SRC->DST:WEIGHT``: every image of class DST becomes
  ``(1 - WEIGHT) * x_dst + WEIGHT * x_src`` with ``x_src`` a random image of class SRC;
  labels are kept (the classic mix of 6s into 2s is ``mix:6->2:0.5``).
- ``random-labels``: every label is drawn uniformly at random.
- ``free-rider``: the update is all zeros; the sample count is still claimed.
- ``scale:K``: the update is multiplied by K.
- ``noise:SIGMA``: N(0, SIGMA^2) noise is added to every update entry.
- ``claim:K``: the party claims K times its real sample count (at Join and with every
  update), to buy weight and credit (:func:`claimed_samples`).

The first three change the local data (:func:`apply_data_attack`); the next three the
update (:func:`apply_update_attack`). Randomness comes only from the ``rng`` argument.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from fedgrpc.errors import ConfigError

log = logging.getLogger(__name__)

DATA_ATTACKS = ("label-flip", "mix", "random-labels")
UPDATE_ATTACKS = ("free-rider", "scale", "noise")
CLAIM_ATTACKS = ("claim",)
SPEC_SYNTAX = (
    "'none', 'label-flip:RATE', 'mix:SRC->DST:WEIGHT', 'random-labels', "
    "'free-rider', 'scale:K', 'noise:SIGMA' or 'claim:K'"
)


@dataclass(frozen=True)
class Attack:
    """A parsed attack: its kind, numeric parameters and the spec it came from."""

    kind: str
    params: tuple[float, ...]
    spec: str

    @property
    def on_data(self) -> bool:
        """Whether the attack changes local data (otherwise it changes the update)."""
        return self.kind in DATA_ATTACKS


def parse_attack(spec: str) -> Attack | None:
    """Parse an attack spec; ``""`` and ``"none"`` mean no attack.

    Raises:
        ConfigError: unknown kind or bad parameters; names the spec and the syntax.
    """
    text = spec.strip()
    if text in ("", "none"):
        return None
    kind, sep, arg = text.partition(":")
    if kind in ("random-labels", "free-rider") and not sep:
        return Attack(kind, (), text)
    if kind == "label-flip" and sep:
        rate = _number(text, arg)
        if not 0.0 <= rate <= 1.0:
            _fail(text, f"RATE must lie in [0, 1], got {rate}")
        return Attack(kind, (rate,), text)
    if kind == "mix" and sep:
        classes, sep2, weight_text = arg.partition(":")
        src_text, arrow, dst_text = classes.partition("->")
        if not sep2 or not arrow:
            _fail(text, "expected mix:SRC->DST:WEIGHT")
        src, dst = _class(text, src_text), _class(text, dst_text)
        weight = _number(text, weight_text)
        if not 0.0 <= weight <= 1.0:
            _fail(text, f"WEIGHT must lie in [0, 1], got {weight}")
        return Attack(kind, (float(src), float(dst), weight), text)
    if kind == "scale" and sep:
        return Attack(kind, (_number(text, arg),), text)
    if kind == "claim" and sep:
        k = _number(text, arg)
        if k <= 0:
            _fail(text, f"K must be > 0, got {k}")
        return Attack(kind, (k,), text)
    if kind == "noise" and sep:
        sigma = _number(text, arg)
        if sigma < 0:
            _fail(text, f"SIGMA must be >= 0, got {sigma}")
        return Attack(kind, (sigma,), text)
    _fail(text, "unknown attack")


def parse_assignments(items: Sequence[str]) -> dict[str, Attack]:
    """Parse ``KEY=SPEC`` items such as ``3=label-flip:0.6`` or ``p7=free-rider``.

    ``KEY`` is a party index or a party id, kept as a string. ``KEY=none`` assigns
    nothing.

    Raises:
        ConfigError: an item without ``=``, an empty or repeated key, or a bad spec.
    """
    out: dict[str, Attack] = {}
    seen: set[str] = set()
    for item in items:
        key, sep, spec = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"bad attack assignment {item!r}: expected PARTY=ATTACK, e.g. "
                "3=label-flip:0.6"
            )
        if key in seen:
            raise ConfigError(f"attack assignment {item!r}: party {key!r} given twice")
        seen.add(key)
        attack = parse_attack(spec)
        if attack is not None:
            out[key] = attack
    return out


def apply_data_attack(
    attack: Attack | None,
    x: npt.NDArray[np.floating[Any]],
    y: npt.NDArray[np.integer[Any]],
    num_classes: int,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Apply a data attack to a party's local data.

    Args:
        attack: The attack; ``None`` or an update attack leaves the data alone.
        x: Samples, ``(N, *input_shape)``.
        y: Labels, ``(N,)``.
        num_classes: Number of classes C.
        rng: Source of every random choice.

    Returns:
        New ``(x, y)`` arrays (float32, int64) for a data attack; otherwise ``x`` and
        ``y`` as given (cast only if their dtypes differ).

    Raises:
        ConfigError: a mix class outside ``[0, num_classes)``.
    """
    x_out = np.asarray(x, dtype=np.float32)
    y_out = np.asarray(y, dtype=np.int64)
    if attack is None or not attack.on_data:
        return x_out, y_out
    n = y_out.shape[0]
    if attack.kind == "label-flip":
        (rate,) = attack.params
        flipped = rng.choice(n, size=round(rate * n), replace=False)
        y_out = y_out.copy()
        y_out[flipped] = num_classes - 1 - y_out[flipped]
        return x_out.copy(), y_out
    if attack.kind == "random-labels":
        return x_out.copy(), rng.integers(0, num_classes, size=(n,), dtype=np.int64)
    # mix:SRC->DST:WEIGHT
    src, dst, weight = int(attack.params[0]), int(attack.params[1]), attack.params[2]
    for c in (src, dst):
        if not 0 <= c < num_classes:
            raise ConfigError(
                f"attack {attack.spec!r}: class {c} outside [0, {num_classes})"
            )
    dst_idx = np.flatnonzero(y_out == dst)
    src_idx = np.flatnonzero(y_out == src)
    x_out = x_out.copy()
    if dst_idx.size == 0 or src_idx.size == 0:
        log.warning(
            "attack %s: local data has %d samples of class %d and %d of class %d; "
            "nothing to blend",
            attack.spec,
            src_idx.size,
            src,
            dst_idx.size,
            dst,
        )
        return x_out, y_out.copy()
    donors = rng.choice(src_idx, size=dst_idx.size, replace=True)
    w = np.float32(weight)
    x_out[dst_idx] = (1 - w) * x_out[dst_idx] + w * x_out[donors]
    return x_out, y_out.copy()


def apply_update_attack(
    attack: Attack | None,
    update: Mapping[str, npt.NDArray[np.floating[Any]]],
    rng: np.random.Generator,
) -> dict[str, npt.NDArray[np.floating[Any]]]:
    """Apply an update attack; each tensor keeps its dtype and shape.

    ``None`` or a data attack returns a new dict holding the same arrays. Noise is
    drawn tensor by tensor in the update's key order, so it is reproducible.
    """
    if attack is None or attack.on_data or attack.kind in CLAIM_ATTACKS:
        return dict(update)
    if attack.kind == "free-rider":
        return {name: np.zeros_like(a) for name, a in update.items()}
    if attack.kind == "scale":
        (k,) = attack.params
        return {name: (a * k).astype(a.dtype) for name, a in update.items()}
    (sigma,) = attack.params
    return {
        name: (a + rng.normal(0.0, sigma, size=a.shape)).astype(a.dtype)
        for name, a in update.items()
    }


def _number(spec: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        _fail(spec, f"{text!r} is not a number")
    if not math.isfinite(value):
        _fail(spec, f"{text!r} is not finite")
    return value


def _class(spec: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        _fail(spec, f"class {text!r} is not an integer")
    if value < 0:
        _fail(spec, f"class {value} is negative")
    return value


def _fail(spec: str, why: str) -> NoReturn:
    """Raise the ConfigError for a bad attack spec."""
    raise ConfigError(f"bad attack {spec!r}: {why}; expected {SPEC_SYNTAX}")


def claimed_samples(attack: Attack | None, num_samples: int) -> int:
    """The sample count a party claims: its real one, or K x it under ``claim:K``."""
    if attack is None or attack.kind != "claim":
        return int(num_samples)
    return max(1, round(attack.params[0] * num_samples))
