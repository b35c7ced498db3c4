"""Placeholder loader (replaced by the packaging work): imports the in-place build."""
from __future__ import annotations


class CppKernelsUnavailable(RuntimeError):
    pass


_error = None
_loaded = False


def load() -> None:
    global _error, _loaded
    if _loaded:
        return
    if _error is not None:
        raise CppKernelsUnavailable(_error)
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        _error = f"the C++ extension faim_kernels._C does not import: {e}"
        raise CppKernelsUnavailable(_error) from e
    _loaded = True


def available() -> bool:
    try:
        load()
    except CppKernelsUnavailable:
        return False
    return True
