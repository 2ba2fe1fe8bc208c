// kvfabric._native: the in-process API of kvfabric for Python (README: launch/python/README.md).
#include "bindings.h"

PYBIND11_MODULE(_native, m) {
  m.doc() = "kvfabric's C++ API: Config, Coordinator, StepPlan, RankCache and the seed classes. "
            "Errors are kvfabric.Error (kvfabric/errors.py) with .code and .message.";
  m.attr("__version__") = KVF_PYTHON_VERSION;
  kvfabric::python::bind_config(m);
  kvfabric::python::bind_coordinator(m);
  kvfabric::python::bind_runtime(m);
  kvfabric::python::bind_seed(m);
}
