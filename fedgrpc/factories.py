"""``package.module:factory`` import strings (torch-free).

Datasets and models can be user code named by an import string. Loading one runs the
module's top-level code: only take such strings from the operator, never from a peer.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from fedgrpc.errors import ConfigError


def load_factory(spec: str, builtins: Sequence[str] = ()) -> Callable[..., Any]:
    """Import the callable named by a ``package.module:factory`` string.

    ``factory`` may be dotted (``module:Class.create``). ``builtins`` are the
    built-in names the same option accepts (``mnist:DIR``); a module that fails to
    import and looks like one of them gets a "did you mean" hint.

    Raises:
        ConfigError: malformed string, module not importable, attribute missing or not
            callable. The message names ``spec``.
    """
    module_name, sep, attr_path = spec.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise ConfigError(
            f"bad import string {spec!r}: expected 'package.module:factory'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} of {spec!r}: {exc}"
            + _import_hint(module_name, builtins)
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(
                f"{spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    if not callable(obj):
        raise ConfigError(f"{spec!r} names a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]


def _import_hint(module_name: str, builtins: Sequence[str]) -> str:
    """Did you mean a built-in name, or is your module not on the import path?"""
    heads = {b.partition(":")[0]: b for b in builtins}
    close = difflib.get_close_matches(module_name, list(heads), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {heads[close[0]]!r}?"
    return (
        "; if it is your own module, put its directory on the import path "
        "(PYTHONPATH=DIR; the processes fedgrpc starts inherit it)"
    )
