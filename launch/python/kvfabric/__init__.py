"""kvfabric for Python: the in-process C++ API (native module) and a client of the control plane.

``kvfabric.Client`` and ``kvfabric.Error`` are pure Python and import without the native module;
``Config``, ``Coordinator``, ``StepPlan``, ``RankCache`` and the seed classes come from
``kvfabric._native``. When that module cannot be loaded, using one of its names raises an
ImportError that says why.
"""

from .errors import *  # noqa: F401,F403  (Error and one subclass per Status code)
from .errors import __all__ as _error_names
from .client import Client, Batch, EventStream, KvEventBatch  # noqa: F401

__all__ = list(_error_names) + ["Client", "Batch", "EventStream", "KvEventBatch"]

try:
    from . import _native
except ImportError as _error:  # not built, or a shared library it needs is missing
    _native = None
    _native_error = _error
else:
    _native_error = None
    __version__ = _native.__version__
    for _name in dir(_native):
        if not _name.startswith("_"):
            globals()[_name] = getattr(_native, _name)
            __all__.append(_name)
    del _name


def __getattr__(name: str):
    if _native is None and not name.startswith("__"):
        raise ImportError(
            f"kvfabric.{name} needs the native module kvfabric._native, which did not load: "
            f"{_native_error}"
        ) from _native_error
    raise AttributeError(f"module 'kvfabric' has no attribute '{name}'")
