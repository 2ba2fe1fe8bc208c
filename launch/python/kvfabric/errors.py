"""kvfabric's one exception type, shared by the native bindings and the control-plane client.

Pure Python on purpose: ``kvfabric.Client`` needs it without the native module, and the native
module raises these same classes (it looks them up here through ``error_for``).
"""

from __future__ import annotations

__all__ = [
    "Error",
    "OutOfMemoryError",
    "SequenceNotFoundError",
    "BlockNotFoundError",
    "InvalidOperationError",
    "InvalidArgumentError",
    "NothingToEvictError",
    "NotFoundError",
    "IoError",
    "ParseError",
    "UnimplementedError",
    "UnavailableError",
    "DataLossError",
    "InternalError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "error_for",
]


class Error(Exception):
    """A refused kvfabric call: ``code`` is the Status code's name ("OutOfMemory",
    "SequenceNotFound", ...), ``message`` the text that names what went wrong.

    A refused call changes nothing, in process (the C++ API's rule) and on the server.
    """

    code: str = "Unknown"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self):  # picklable (multiprocessing, mpi4py) with every attribute (.done)
        return (error_for, (self.code, self.message), dict(self.__dict__))


class OutOfMemoryError(Error):
    code = "OutOfMemory"


class SequenceNotFoundError(Error):
    code = "SequenceNotFound"


class BlockNotFoundError(Error):
    code = "BlockNotFound"


class InvalidOperationError(Error):
    code = "InvalidOperation"


class InvalidArgumentError(Error, ValueError):
    """Also a ValueError: bad arguments (an array of the wrong dtype or shape, a malformed
    request) are what Python code expects to catch as ValueError."""

    code = "InvalidArgument"


class NothingToEvictError(Error):
    code = "NothingToEvict"


class NotFoundError(Error):
    code = "NotFound"


class IoError(Error):
    code = "IoError"


class ParseError(Error):
    code = "ParseError"


class UnimplementedError(Error):
    code = "Unimplemented"


class UnavailableError(Error):
    code = "Unavailable"


class DataLossError(Error):
    code = "DataLoss"


class InternalError(Error):
    code = "Internal"


class ResourceExhaustedError(Error):
    code = "ResourceExhausted"


class UnauthenticatedError(Error):
    code = "Unauthenticated"


class PermissionDeniedError(Error):
    code = "PermissionDenied"


_BY_CODE = {
    cls.code: cls
    for cls in (
        OutOfMemoryError,
        SequenceNotFoundError,
        BlockNotFoundError,
        InvalidOperationError,
        InvalidArgumentError,
        NothingToEvictError,
        NotFoundError,
        IoError,
        ParseError,
        UnimplementedError,
        UnavailableError,
        DataLossError,
        InternalError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
    )
}


def error_for(code: str, message: str) -> Error:
    """The exception for a Status code name: its subclass, or Error itself for a code this
    version does not know (a newer server's)."""
    return _BY_CODE.get(code, Error)(code, message)
