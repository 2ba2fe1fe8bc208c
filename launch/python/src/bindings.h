// Shared pieces of the kvfabric._native bindings: Status -> kvfabric.Error, tensor arguments
// (NumPy on the CPU backend; DLPack or __cuda_array_interface__ on the CUDA backend), index
// arrays, and read-only record classes with a __repr__.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/operators.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kvfabric/backend/backend.h"
#include "kvfabric/common/dtype.h"
#include "kvfabric/common/ids.h"
#include "kvfabric/common/status.h"
#include "kvfabric/config/config.h"

namespace kvfabric::python {

namespace py = pybind11;

// --- errors (errors.cc) -----------------------------------------------------------------------

//! Raises the kvfabric.errors class for `status` (kvfabric.Error with .code and .message).
[[noreturn]] void raise_status(const Status& status);
//! The same, with attributes `extra` set on the exception (append's `done`).
[[noreturn]] void raise_status(const Status& status, const py::dict& extra);
//! kvfabric.InvalidArgumentError (also a ValueError) with `message`.
[[noreturn]] void raise_invalid(const std::string& message);

inline void check(const Status& status) {
  if (!status.ok()) raise_status(status);
}
template <typename T>
T unwrap(Result<T>&& result) {
  if (!result.ok()) raise_status(result.status());
  return std::move(result).value();
}

//! Runs `f` with the GIL released (long C++ calls: a step, attention, a collective), so other
//! Python threads run meanwhile. `f` must not touch Python objects.
template <typename F>
auto without_gil(F&& f) {
  py::gil_scoped_release release;
  return f();
}

// --- tensors and index arrays (arrays.cc) -----------------------------------------------------

//! Where a tensor argument must live: host memory (CPU backend) or device memory (CUDA backend).
enum class Memory : uint8_t { kHost, kDevice };

//! A borrowed, C-contiguous tensor argument. It keeps its source alive (and, for DLPack, calls
//! the producer's deleter) until destroyed.
class Tensor {
 public:
  Tensor() = default;
  Tensor(Tensor&&) noexcept;
  Tensor& operator=(Tensor&&) noexcept;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  ~Tensor();

  [[nodiscard]] void* data() const { return data_; }
  [[nodiscard]] DType dtype() const { return dtype_; }
  [[nodiscard]] const std::vector<int64_t>& shape() const { return shape_; }
  [[nodiscard]] int64_t size() const;
  [[nodiscard]] bool writable() const { return writable_; }
  //! The NumPy array it came from (host tensors only), to hand back as a result.
  [[nodiscard]] const py::object& source() const { return source_; }

  //! `name` must be a contiguous tensor of one of `dtypes` in `memory`, `ndim` dimensions.
  //! Host: a NumPy array (f32, f16; bf16 has no NumPy dtype). Device: an object with
  //! __cuda_array_interface__ (CuPy, Numba, PyTorch) or __dlpack__ on a CUDA device.
  //! Anything else is an InvalidArgumentError naming the argument and what is wrong.
  static Tensor from(const py::handle& obj, const char* name, Memory memory,
                     std::initializer_list<DType> dtypes, int ndim, bool writable);

  //! InvalidArgumentError unless dimension `dim` is `expected` (`what` names it).
  void expect_dim(const char* name, int dim, int64_t expected, const char* what) const;

 private:
  void release_dlpack() noexcept;  // calls the consumed DLPack tensor's deleter, once

  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  std::vector<int64_t> shape_;
  bool writable_ = false;
  py::object source_;               // keeps the producer alive
  void* dl_managed_ = nullptr;      // a consumed DLManagedTensor, deleted with this object
};

//! A new host NumPy array of `dtype` (f32 or f16) and `shape`, zero-filled.
py::array new_host_array(DType dtype, const std::vector<int64_t>& shape);

//! The Python type name of `obj`, for error messages ("int64", "str").
std::string type_name(const py::handle& obj);
//! InvalidArgumentError naming `name` when `obj` is a NumPy masked array: its data holds what
//! the mask hides, and reading it as values would take those silently.
void refuse_masked(const py::handle& obj, const char* name);
//! One id (a Python int or anything with __index__, such as a NumPy integer) in [0, max];
//! the message names the argument.
uint64_t index_arg(const py::handle& obj, const char* name, uint64_t max);

//! A 1-D list of non-negative integers (a NumPy integer array or a Python sequence) as T,
//! each checked to fit; the message names the argument and the element.
template <typename T>
std::vector<T> index_vector(const py::handle& obj, const char* name);
//! A 2-D table of block ids: a NumPy integer array [rows, cols] or a list of lists of any
//! lengths (padded with kInvalidBlockId). Returns the row-major table and its width.
std::pair<std::vector<uint32_t>, uint32_t> block_table_arg(const py::handle& obj, const char* name,
                                                           size_t rows);

//! A Python sequence of token ids (ints or a NumPy integer array) as uint32 TokenIds.
std::vector<uint32_t> tokens_arg(const py::handle& obj, const char* name);

//! A backend shared by the caches made on it (RankCache, KvCache keep it alive), and where the
//! tensors it takes live.
struct BackendHandle {
  std::unique_ptr<Backend> backend;
  Memory memory = Memory::kHost;
};

// --- records ------------------------------------------------------------------------------------

//! Gives `cls` a __repr__ listing `fields` as `Type(a=1, b=[2, 3])` and an __eq__ comparing
//! them (and no __hash__: the objects compare by value but may change).
template <typename T>
void def_repr_and_eq(py::class_<T>& cls, const std::string& type,
                     const std::shared_ptr<std::vector<std::string>>& fields) {
  cls.def("__repr__", [fields, type](const py::object& self) {
    std::string out = type + "(";
    for (size_t i = 0; i < fields->size(); ++i) {
      if (i) out += ", ";
      out += (*fields)[i] + "=" + py::repr(self.attr((*fields)[i].c_str())).cast<std::string>();
    }
    return out + ")";
  });
  cls.def("__eq__", [fields](const py::object& self, const py::object& other) {
    if (!py::type::of(self).is(py::type::of(other))) return false;
    for (const std::string& f : *fields) {
      if (!self.attr(f.c_str()).equal(other.attr(f.c_str()))) return false;
    }
    return true;
  });
  cls.attr("__hash__") = py::none();
}

//! A read-only Python view of a C++ struct: each field becomes an attribute, and __repr__ lists
//! them as `Name(a=1, b=[2, 3])`; __eq__ compares the fields.
template <typename T>
class Record {
 public:
  Record(py::handle scope, const char* name, const char* doc = "")
      : cls_(scope, name, doc), name_(name), fields_(std::make_shared<std::vector<std::string>>()) {}

  template <typename M>
  Record& field(const char* name, M T::*member, const char* doc = "") {
    cls_.def_readonly(name, member, doc);
    fields_->push_back(name);
    return *this;
  }
  //! A computed attribute (a BlockId as int, an enum as its name).
  template <typename Getter>
  Record& computed(const char* name, Getter getter, const char* doc = "") {
    cls_.def_property_readonly(name, getter, doc);
    fields_->push_back(name);
    return *this;
  }
  py::class_<T>& cls() { return cls_; }

  // __repr__ and __eq__ are defined last, once every field() has named its attribute.
  ~Record() { def_repr_and_eq(cls_, name_, fields_); }

 private:
  py::class_<T> cls_;
  std::string name_;
  std::shared_ptr<std::vector<std::string>> fields_;
};

// --- the parts of the module ------------------------------------------------------------------

void bind_config(py::module_& m);
void bind_coordinator(py::module_& m);
void bind_runtime(py::module_& m);
void bind_seed(py::module_& m);

//! dtype names ("f32", "bf16", ...) to DType, an InvalidArgumentError naming `what` otherwise.
DType dtype_arg(const std::string& name, const char* what);

}  // namespace kvfabric::python

namespace pybind11::detail {

//! SeqId, BlockId and RankId are plain ints in Python.
template <typename Tag, typename Rep>
struct type_caster<kvfabric::StrongId<Tag, Rep>> {
  using Id = kvfabric::StrongId<Tag, Rep>;
  PYBIND11_TYPE_CASTER(Id, const_name("int"));
  bool load(handle src, bool convert) {
    // A bool is an int to Python: refused rather than read as id 0 or 1. An int that is no id
    // (negative, too large) is named here; pybind11 would only say the arguments do not match.
    if (PyBool_Check(src.ptr())) kvfabric::python::raise_invalid("an id must be an integer (got bool)");
    make_caster<Rep> rep;
    if (!rep.load(src, convert)) {
      if (PyLong_Check(src.ptr())) {
        kvfabric::python::raise_invalid(
            "id " + pybind11::str(src).cast<std::string>() + " is outside [0, " +
            std::to_string(std::numeric_limits<Rep>::max()) + "]");
      }
      return false;
    }
    value = kvfabric::StrongId<Tag, Rep>(cast_op<Rep>(rep));
    return true;
  }
  static handle cast(const kvfabric::StrongId<Tag, Rep>& id, return_value_policy policy,
                     handle parent) {
    return make_caster<Rep>::cast(id.value, policy, parent);
  }
};

//! A DType is its name in Python ("f32", "f16", "bf16", "fp8_e4m3", "int8", "int4", "int2").
template <>
struct type_caster<kvfabric::DType> {
  PYBIND11_TYPE_CASTER(kvfabric::DType, const_name("str"));
  bool load(handle src, bool);
  static handle cast(kvfabric::DType dtype, return_value_policy, handle);
};

//! An EvictionPolicy is its name ("lru", "lfu", "longest_first", "priority", "streaming_llm").
template <>
struct type_caster<kvfabric::EvictionPolicy> {
  PYBIND11_TYPE_CASTER(kvfabric::EvictionPolicy, const_name("str"));
  bool load(handle src, bool);
  static handle cast(kvfabric::EvictionPolicy policy, return_value_policy, handle);
};

}  // namespace pybind11::detail
