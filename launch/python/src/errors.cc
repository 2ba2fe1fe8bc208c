// Status -> the exception classes of kvfabric/errors.py (pure Python, shared with the client).
#include <string>

#include "bindings.h"

namespace kvfabric::python {

namespace {

[[noreturn]] void raise_code(std::string_view code, const std::string& message,
                             const py::dict& extra = {}) {
  // errors.py is imported on demand (it is cached in sys.modules after the first time), so the
  // module keeps no Python object alive in a static past the interpreter's end.
  py::object error = py::module_::import("kvfabric.errors")
                         .attr("error_for")(py::str(code.data(), code.size()), message);
  for (const auto& [key, value] : extra) error.attr(key) = value;
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
  throw py::error_already_set();
}

}  // namespace

void raise_status(const Status& status) {
  raise_code(error_code_name(status.code()), status.message());
}

void raise_status(const Status& status, const py::dict& extra) {
  raise_code(error_code_name(status.code()), status.message(), extra);
}

void raise_invalid(const std::string& message) {
  raise_code(error_code_name(ErrorCode::kInvalidArgument), message);
}

}  // namespace kvfabric::python
