"""kvfabric.errors: one exception type with the Status code and message (pure Python)."""

from __future__ import annotations

import pickle

import pytest

from kvfabric import errors


def test_each_code_has_its_class():
    e = errors.error_for("OutOfMemory", "Out of memory: requested 3 blocks, 2 available")
    assert type(e) is errors.OutOfMemoryError and isinstance(e, errors.Error)
    assert (e.code, e.message) == ("OutOfMemory", "Out of memory: requested 3 blocks, 2 available")
    assert str(e) == "OutOfMemory: Out of memory: requested 3 blocks, 2 available"
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and cls is not errors.Error:
            assert type(errors.error_for(cls.code, "m")) is cls


def test_an_unknown_code_is_still_an_error():
    e = errors.error_for("SomethingNew", "from a newer server")
    assert type(e) is errors.Error and e.code == "SomethingNew"


def test_invalid_argument_is_a_value_error_and_errors_pickle():
    with pytest.raises(ValueError):
        raise errors.error_for("InvalidArgument", "bad")
    e = pickle.loads(pickle.dumps(errors.error_for("PermissionDenied", "step is an admin's")))
    assert type(e) is errors.PermissionDeniedError and e.message == "step is an admin's"
    # Regression: attributes beyond code and message (a refused batch append's .done) were lost.
    refused = errors.error_for("OutOfMemory", "no room")
    refused.done = 3
    copy = pickle.loads(pickle.dumps(refused))
    assert type(copy) is errors.OutOfMemoryError and copy.done == 3 and copy.code == "OutOfMemory"
