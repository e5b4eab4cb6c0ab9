"""Tensor dtypes on the wire, and array <-> wire-representation conversion (DESIGN §2).

A tensor travels as name, dtype, shape and raw little-endian C-order bytes. Object and
other dtypes cannot travel. float32 tensors may travel as float16 or bfloat16 (the
upper 16 bits of a float32, round to nearest even) and are widened back to float32.
Nothing here unpickles or evaluates anything.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np

from fedgrpc.errors import InvalidUpdateError
from fedgrpc.proto import tensor_pb2

# dtype name -> (proto enum, itemsize). bfloat16 has no NumPy dtype: it travels as the
# upper 16 bits of a float32 and is decoded to float32.
_DTYPES: dict[str, tuple[tensor_pb2.DType.ValueType, int]] = {
    "float32": (tensor_pb2.FLOAT32, 4),
    "float16": (tensor_pb2.FLOAT16, 2),
    "bfloat16": (tensor_pb2.BFLOAT16, 2),
    "float64": (tensor_pb2.FLOAT64, 8),
    "int64": (tensor_pb2.INT64, 8),
    "int32": (tensor_pb2.INT32, 4),
    "uint8": (tensor_pb2.UINT8, 1),
    "bool": (tensor_pb2.BOOL, 1),
}
FROM_PROTO: dict[int, str] = {enum: name for name, (enum, _) in _DTYPES.items()}
# Storage dtype of the raw bytes for each wire dtype (little-endian).
STORAGE: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}


def dtype_names() -> tuple[str, ...]:
    """Every dtype that can travel on the wire."""
    return tuple(_DTYPES)


def dtype_to_proto(name: str) -> tensor_pb2.DType.ValueType:
    """Proto enum of a dtype name."""
    try:
        return _DTYPES[name][0]
    except KeyError:
        raise InvalidUpdateError(f"dtype {name!r} cannot travel on the wire") from None


def dtype_from_proto(value: int) -> str:
    """Dtype name of a proto enum value."""
    try:
        return FROM_PROTO[value]
    except KeyError:
        raise InvalidUpdateError(f"unknown wire dtype enum {value}") from None


def itemsize(name: str) -> int:
    """Bytes per element of a wire dtype."""
    return _DTYPES[name][1]


def dtype_name_of(arr: np.ndarray) -> str:
    """Wire dtype name of an array (object and other dtypes refused)."""
    kind = arr.dtype
    if kind == np.bool_:
        return "bool"
    name = kind.name
    if name not in _DTYPES or name == "bfloat16":
        raise InvalidUpdateError(f"arrays of dtype {kind} cannot travel on the wire")
    return name


def _loaded_torch() -> Any:
    """The torch module if this process already imported it (parties do), or None.

    Its float16/bfloat16 casts are ~15x faster than NumPy's (2.5 vs 40 ms for 16 M
    elements here), with the same IEEE round-to-nearest-even results. The aggregator
    never imports torch for this: there NumPy does the casts.
    """
    torch = sys.modules.get("torch")
    if torch is None or sys.byteorder != "little":
        return None
    return torch


def _as_torch(torch: Any, a: np.ndarray) -> Any:
    with warnings.catch_warnings():  # read-only wire views: torch only reads them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def to_wire_array(arr: np.ndarray, wire_dtype: str | None = None) -> np.ndarray:
    """The array as its little-endian, C-contiguous wire representation.

    Float arrays are converted to ``wire_dtype`` (float16, or bfloat16 by
    round-to-nearest-even of the float32 bit pattern) when given. Returns a view when no
    conversion is needed.
    """
    src = dtype_name_of(arr)
    target = src if wire_dtype is None or src != "float32" else wire_dtype
    if target in ("float16", "bfloat16") and (torch := _loaded_torch()) is not None:
        t = _as_torch(torch, np.ascontiguousarray(arr, dtype="<f4"))
        if target == "float16":
            half: np.ndarray = t.to(torch.float16).numpy().view("<f2")
            return half
        bf: np.ndarray = t.to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
        return _keep_bfloat16_nans(t.numpy(), bf)  # torch canonicalises NaNs
    if target == "bfloat16":
        f32 = np.ascontiguousarray(arr, dtype="<f4")
        bits = f32.view("<u4")
        # Round to nearest even on the dropped 16 bits.
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return _keep_bfloat16_nans(f32, ((bits + rounding) >> 16).astype("<u2"))
    return np.ascontiguousarray(arr, dtype=STORAGE[target])


def _keep_bfloat16_nans(f32: np.ndarray, out: np.ndarray) -> np.ndarray:
    """NaNs stay NaN in bfloat16 ``out``: their upper bits, quiet bit set."""
    nan = np.isnan(f32)
    if nan.any():
        out[nan] = (f32.view("<u4")[nan] >> 16).astype("<u2") | np.uint16(0x40)
    return out


def from_wire_array(
    raw: np.ndarray, wire_dtype: str, out_dtype: str, out: np.ndarray | None = None
) -> np.ndarray:
    """Wire-format elements as ``out_dtype`` (a view when no conversion is needed).

    With ``out`` (float32, same size) the values are written there, with no
    temporary, and ``out`` is returned.
    """
    if out is not None:
        if out_dtype != "float32" or out.dtype != np.float32 or out.size != raw.size:
            raise ValueError("out must be a float32 array of the same size")
        if wire_dtype == "bfloat16":
            np.left_shift(raw, 16, out=out.view("<u4"), dtype="<u4")
        elif wire_dtype == "float16":
            if (torch := _loaded_torch()) is not None:
                _as_torch(torch, out).copy_(_as_torch(torch, raw))
            else:
                _widen_float16(raw, out)
        else:
            np.copyto(out, raw, casting="same_kind")
        return out
    if wire_dtype == "bfloat16":
        values = (raw.astype("<u4") << 16).view("<f4")
        return values if out_dtype == "float32" else values.astype(out_dtype)
    if wire_dtype == out_dtype:
        return raw
    return raw.astype(out_dtype)


_F16_RESCALE = np.float32(2.0**112)  # 2^(127 - 15): half exponent bias -> float32


def _widen_float16(raw: np.ndarray, out: np.ndarray) -> None:
    """float16 -> float32 into ``out`` with integer ops: exact, 2x NumPy's cast here.

    The 15 exponent+mantissa bits shifted into float32 position read as the value
    times 2^-112 (normals and subnormals alike), so one multiply rescales them;
    infinities and NaNs get the float32 all-ones exponent; the sign is ORed back.
    """
    bits = raw.view("<u2")
    o = out.view("<u4")
    sign = np.bitwise_and(bits, 0x8000, dtype="<u4")
    np.bitwise_xor(bits, sign, out=o, dtype="<u4")
    np.left_shift(o, 13, out=o)
    np.multiply(out, _F16_RESCALE, out=out)
    special = np.bitwise_and(bits, 0x7C00) == 0x7C00
    if special.any():
        mant = np.bitwise_and(bits[special], 0x3FF).astype("<u4")
        o[special] = np.uint32(0x7F800000) | (mant << 13)
    np.left_shift(sign, 16, out=sign)
    np.bitwise_or(o, sign, out=o)
