"""Export a run's model as a PyTorch state dict: ``.pt`` or ``.safetensors``.

The model is rebuilt from the description the run recorded (name, input shape,
classes, hidden width), its parameters filled from a checkpoint, and its whole
``state_dict()`` written, so ``build_model(...).load_state_dict(...)`` accepts the
file with ``strict=True``. The description travels with the file: in the
safetensors header's ``__metadata__`` and, for both formats, in ``FILE.json``.

The safetensors file is written here (8-byte little-endian header length, the JSON
header, then each tensor's raw little-endian C-order bytes), so no extra dependency is
needed to produce it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgrpc.errors import ConfigError
from fedgrpc.learning.models import build_model, set_params
from fedgrpc.store.files import atomic_write

EXPORT_FORMATS = ("safetensors", "pt")
_ST_DTYPES = {
    torch.float32: ("F32", "<f4"),
    torch.float64: ("F64", "<f8"),
    torch.float16: ("F16", "<f2"),
    torch.int64: ("I64", "<i8"),
    torch.int32: ("I32", "<i4"),
    torch.uint8: ("U8", "u1"),
    torch.bool: ("BOOL", "?"),
}


def model_from_description(
    desc: Mapping[str, Any], params: Mapping[str, np.ndarray]
) -> torch.nn.Module:
    """The model ``desc`` describes, with ``params`` as its parameters."""
    model = build_model(
        str(desc["model"]),
        tuple(int(d) for d in desc["input_shape"]),
        int(desc["num_classes"]),
        int(desc["hidden"]),
    )
    set_params(model, params)
    return model


def safetensors_bytes(
    state: Mapping[str, torch.Tensor], meta: Mapping[str, str]
) -> bytes:
    """A safetensors file of ``state`` with string metadata ``meta``."""
    header: dict[str, Any] = {"__metadata__": dict(meta)}
    blobs = []
    offset = 0
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ConfigError(f"tensor {name!r}: dtype {t.dtype} cannot be exported")
        code, np_dtype = _ST_DTYPES[t.dtype]
        # (numel,) little-endian C order, as the format wants
        data = np.ascontiguousarray(t.numpy().reshape(-1), dtype=np_dtype).data.cast(
            "B"
        )
        header[name] = {
            "dtype": code,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(bytes(data))
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-aligned
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def export_model(
    params: Mapping[str, np.ndarray],
    desc: Mapping[str, Any],
    out: Path,
    fmt: str,
) -> Path:
    """Write the state dict to ``out`` (and ``out.json``); return ``out``."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    state = model_from_description(desc, params).state_dict()
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in desc.items()}
    if fmt == "safetensors":
        atomic_write(out, safetensors_bytes(state, meta))
    else:
        tmp = out.with_name(out.name + ".tmp")
        torch.save(state, tmp)  # a file format, not the wire: torch.save belongs here
        atomic_write(out, tmp.read_bytes())
        tmp.unlink()
    atomic_write(
        out.with_name(out.name + ".json"),
        (json.dumps(dict(desc), indent=2) + "\n").encode(),
    )
    return out
