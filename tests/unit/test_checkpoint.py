from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedgrpc.errors import ConfigError, FedGrpcError
from fedgrpc.store.checkpoint import load_arrays, save_arrays
from fedgrpc.store.files import atomic_write

UNPICKLED: list[str] = []


def _record_unpickle(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Canary:
    """Unpickling this appends to UNPICKLED: proves whether a loader ran pickle."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record_unpickle, ("canary",))


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "fc1.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "fc1.bias": np.zeros(3, dtype=np.float64),
        "step": np.array(7, dtype=np.int64),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 5), dtype=np.float32),
    }


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _object_array_npz(path: Path) -> None:
    """A .npz holding a pickled object array (np.savez does that by default)."""
    np.savez(path, w=np.zeros(2, np.float32), evil=np.array([Canary()], dtype=object))


def test_checkpoint_round_trip_with_meta(tmp_path: Path) -> None:
    path = tmp_path / "run" / "model-0003.npz"
    arrays = _arrays()
    meta = {"round": 3, "run_id": "r1", "digest": "ab" * 32, "nested": {"lr": [0.5]}}

    digest = save_arrays(path, arrays, meta)
    loaded, loaded_meta = load_arrays(path)

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "run" / "model-0003.npz.sha256").read_text() == digest + "\n"
    assert loaded_meta == meta
    assert list(loaded) == list(arrays)
    for name, arr in arrays.items():
        assert loaded[name].dtype == arr.dtype
        assert loaded[name].shape == arr.shape
        np.testing.assert_array_equal(loaded[name], arr)


def test_checkpoint_without_meta(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"

    save_arrays(path, {"w": np.ones(3, np.float32)})
    loaded, meta = load_arrays(path)

    assert meta == {}
    assert list(loaded) == ["w"]


def test_checkpoint_overwrite_replaces(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    save_arrays(path, {"w": np.zeros(3, np.float32)}, {"round": 1})

    save_arrays(path, {"w": np.ones(3, np.float32)}, {"round": 2})
    loaded, meta = load_arrays(path)

    assert meta == {"round": 2}
    np.testing.assert_array_equal(loaded["w"], np.ones(3))


def test_checkpoint_flipped_byte_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    save_arrays(path, _arrays(), {"round": 1})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(ConfigError, match=r"checkpoint .*m\.npz is corrupt: sha256"):
        load_arrays(path)


def test_checkpoint_expected_sha256_checked(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    digest = save_arrays(path, _arrays())
    (tmp_path / "m.npz.sha256").unlink()

    loaded, _ = load_arrays(path, expected_sha256=digest)
    with pytest.raises(ConfigError, match="is corrupt"):
        load_arrays(path, expected_sha256="0" * 64)

    assert set(loaded) == set(_arrays())


def test_checkpoint_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint .*nope\.npz does not exist"):
        load_arrays(tmp_path / "nope.npz")


def test_checkpoint_no_leftover_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"

    save_arrays(path, _arrays(), {"round": 1})
    save_arrays(path, _arrays(), {"round": 2})

    assert _listing(tmp_path) == ["m.npz", "m.npz.sha256"]


def test_checkpoint_failed_save_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"

    with pytest.raises(TypeError):
        save_arrays(path, _arrays(), {"bad": object()})  # not JSON

    assert _listing(tmp_path) == []


def test_checkpoint_atomic_write(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.json"

    atomic_write(path, b"{}")
    atomic_write(path, b'{"a": 1}')

    assert path.read_bytes() == b'{"a": 1}'
    assert _listing(tmp_path / "sub") == ["f.json"]


def test_checkpoint_object_array_file_refused_without_unpickling(
    tmp_path: Path,
) -> None:
    path = tmp_path / "evil.npz"
    _object_array_npz(path)
    with zipfile.ZipFile(path) as z:  # the file really holds a pickle
        header = z.read("evil.npy")[:128]
    assert b"'descr': '|O'" in header
    UNPICKLED.clear()

    with pytest.raises(ConfigError, match=r"cannot read checkpoint .*evil\.npz"):
        load_arrays(path)

    assert UNPICKLED == []


def test_checkpoint_object_array_with_valid_sidecar_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    _object_array_npz(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    UNPICKLED.clear()

    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        load_arrays(path, expected_sha256=digest)

    assert UNPICKLED == []


def test_checkpoint_save_refuses_object_arrays(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"

    with pytest.raises(FedGrpcError):
        save_arrays(path, {"o": np.array([{"a": 1}], dtype=object)})

    assert _listing(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_checkpoint_corrupt_file_without_sidecar(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "m.npz"
    save_arrays(path, _arrays())
    (tmp_path / "m.npz.sha256").unlink()
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[200] ^= 0xFF  # inside the first member's data: CRC mismatch
    path.write_bytes(bytes(data))

    with pytest.raises(ConfigError, match=r"m\.npz"):
        load_arrays(path)


def test_checkpoint_not_an_npz_without_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    path.write_bytes(b"definitely not a zip file")

    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        load_arrays(path)


def test_checkpoint_bare_npy_pickle_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    buf = io.BytesIO()
    np.save(buf, np.array([Canary()], dtype=object), allow_pickle=True)
    path.write_bytes(buf.getvalue())
    UNPICKLED.clear()

    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        load_arrays(path)

    assert UNPICKLED == []


def test_checkpoint_plain_npy_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, np.float32))
    path.write_bytes(buf.getvalue())

    with pytest.raises(ConfigError, match=r"m\.npz"):
        load_arrays(path)


def test_checkpoint_written_from_memory_reads_like_savez(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedgrpc.store import checkpoint

    monkeypatch.setattr(checkpoint, "_WRITE_BLOCK", 40)  # many blocks per array
    rng = np.random.default_rng(1)
    arrays = {
        **_arrays(),
        "big": rng.normal(size=1001).astype(np.float32),
        "fortran": np.asfortranarray(rng.normal(size=(3, 5))),
        "strided": rng.normal(size=20)[::3],
        "big_endian": np.arange(7, dtype=">i4"),
    }
    ours, theirs = tmp_path / "ours.npz", tmp_path / "theirs.npz"

    digest = save_arrays(ours, arrays)
    np.savez(theirs, allow_pickle=False, **arrays)

    assert digest == hashlib.sha256(ours.read_bytes()).hexdigest()
    with np.load(ours, allow_pickle=False) as a, np.load(theirs) as b:
        assert a.files == b.files
        for name in b.files:
            assert a[name].dtype == b[name].dtype, name
            np.testing.assert_array_equal(a[name], b[name])


def test_checkpoint_written_unhashed_is_sealed_later(tmp_path: Path) -> None:
    from fedgrpc.store.checkpoint import seal, write_arrays

    path = tmp_path / "m.npz"

    write_arrays(path, _arrays(), {"round": 1})
    before = _listing(tmp_path)
    loaded_unsealed, _ = load_arrays(path)  # the zip CRCs alone check it
    digest = seal(path)
    loaded, meta = load_arrays(path)

    assert before == ["m.npz"]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "m.npz.sha256").read_text() == digest + "\n"
    assert list(loaded_unsealed) == list(loaded) == list(_arrays())
    assert meta == {"round": 1}


def test_checkpoint_unsealed_damage_is_caught_by_the_zip_crc(tmp_path: Path) -> None:
    from fedgrpc.store.checkpoint import write_arrays

    path = tmp_path / "m.npz"
    write_arrays(path, {"w": np.arange(1000, dtype=np.float32)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside w's values
    path.write_bytes(bytes(data))

    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        load_arrays(path)
