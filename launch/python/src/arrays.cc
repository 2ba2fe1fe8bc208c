// Tensor and index-array arguments: every check names the argument and what is wrong, before
// anything reaches the C++ API (whose own checks then cover the values: block ids, lengths).
#include <fmt/format.h>

#include <algorithm>
#include <iterator>
#include <span>
#include <string>

#include "bindings.h"

namespace kvfabric::python {

namespace {

// The DLPack ABI (dlpack.h, the unversioned DLManagedTensor every producer still offers).
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
constexpr int32_t kDLCUDA = 2;
constexpr int32_t kDLCUDAManaged = 13;
constexpr uint8_t kDLFloat = 2;
constexpr uint8_t kDLBfloat = 4;

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return out + (shape.size() == 1 ? ",)" : ")");
}

// Array dtypes by their NumPy / PyTorch names.
std::string dtype_text(DType d) {
  switch (d) {
    case DType::kF32:
      return "float32";
    case DType::kF16:
      return "float16";
    case DType::kBF16:
      return "bfloat16";
    default:
      return std::string(dtype_name(d));
  }
}

std::string dtype_list(std::span<const DType> dtypes) {
  std::string out;
  for (DType d : dtypes) {
    if (!out.empty()) out += " or ";
    out += dtype_text(d);
  }
  return out;
}

std::string dtype_list(std::initializer_list<DType> dtypes) {
  return dtype_list(std::span<const DType>(dtypes.begin(), dtypes.size()));
}

// Whether `strides` (in elements; empty = C order) describe a C-contiguous tensor of `shape`.
bool c_contiguous(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides) {
  if (strides.empty()) return true;
  int64_t expected = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

bool has_attr(const py::handle& obj, const char* name) {
  return PyObject_HasAttrString(obj.ptr(), name) == 1;
}

}  // namespace

std::string type_name(const py::handle& obj) {
  return py::str(py::type::of(obj).attr("__name__")).cast<std::string>();
}

void refuse_masked(const py::handle& obj, const char* name) {
  if (has_attr(obj, "mask") && has_attr(obj, "filled")) {
    raise_invalid(fmt::format("{} is a masked array: pass {}.filled(value) or its .data", name,
                              name));
  }
}

uint64_t index_arg(const py::handle& obj, const char* name, uint64_t max) {
  if (PyBool_Check(obj.ptr())) raise_invalid(fmt::format("{} must be an integer (got bool)", name));
  auto index = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!index) {
    PyErr_Clear();
    raise_invalid(fmt::format("{} must be an integer (got {})", name, type_name(obj)));
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0 || v < 0 || static_cast<uint64_t>(v) > max) {
    raise_invalid(fmt::format("{} = {} is outside [0, {}]", name,
                              py::str(index).cast<std::string>(), max));
  }
  return static_cast<uint64_t>(v);
}

Tensor::Tensor(Tensor&& other) noexcept {
  *this = std::move(other);
}

Tensor& Tensor::operator=(Tensor&& other) noexcept {
  if (this != &other) {
    // Only the consumed DLPack tensor is released by hand: the members assign as members (ending
    // their lifetimes with ~Tensor() and then assigning to them was undefined).
    release_dlpack();
    data_ = other.data_;
    dtype_ = other.dtype_;
    shape_ = std::move(other.shape_);
    writable_ = other.writable_;
    source_ = std::move(other.source_);
    dl_managed_ = std::exchange(other.dl_managed_, nullptr);
  }
  return *this;
}

Tensor::~Tensor() { release_dlpack(); }

void Tensor::release_dlpack() noexcept {
  if (auto* managed = static_cast<DLManagedTensor*>(std::exchange(dl_managed_, nullptr))) {
    if (managed->deleter) managed->deleter(managed);
  }
}

int64_t Tensor::size() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

void Tensor::expect_dim(const char* name, int dim, int64_t expected, const char* what) const {
  if (shape_[dim] != expected) {
    raise_invalid(fmt::format("{} has shape {}: dimension {} ({}) must be {}", name,
                              shape_text(shape_), dim, what, expected));
  }
}

Tensor Tensor::from(const py::handle& obj, const char* name, Memory memory,
                    std::initializer_list<DType> dtypes, int ndim, bool writable) {
  Tensor t;
  std::vector<int64_t> strides;  // in elements
  if (memory == Memory::kHost) {
    if (!py::isinstance<py::array>(obj)) {
      if (has_attr(obj, "__cuda_array_interface__")) {
        raise_invalid(fmt::format("{} is a CUDA array, but this cache's backend is the CPU "
                                  "backend: pass a NumPy array",
                                  name));
      }
      raise_invalid(fmt::format("{} must be a NumPy array (got {})", name, type_name(obj)));
    }
    refuse_masked(obj, name);
    auto array = py::reinterpret_borrow<py::array>(obj);
    const py::dtype dt = array.dtype();
    if (dt.is(py::dtype::of<float>()) || (dt.kind() == 'f' && dt.itemsize() == 4)) {
      t.dtype_ = DType::kF32;
    } else if (dt.kind() == 'f' && dt.itemsize() == 2) {
      t.dtype_ = DType::kF16;
    } else {  // NumPy has no bfloat16: a NumPy caller is offered what NumPy can hold
      std::vector<DType> numpy_dtypes;
      std::copy_if(dtypes.begin(), dtypes.end(), std::back_inserter(numpy_dtypes),
                   [](DType d) { return d != DType::kBF16; });
      raise_invalid(fmt::format("{} has dtype {}; expected {}", name,
                                dt.attr("name").cast<std::string>(), dtype_list(numpy_dtypes)));
    }
    if (dt.byteorder() == '>') {
      raise_invalid(fmt::format("{} is big-endian; expected native byte order", name));
    }
    t.shape_.assign(array.shape(), array.shape() + array.ndim());
    if (!(array.flags() & py::array::c_style)) {
      raise_invalid(fmt::format("{} (shape {}) is not C-contiguous: pass "
                                "numpy.ascontiguousarray({})",
                                name, shape_text(t.shape_), name));
    }
    if (!(array.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
      raise_invalid(fmt::format("{} is not aligned to its dtype", name));
    }
    t.writable_ = array.writeable();
    t.data_ = const_cast<void*>(array.data());
    t.source_ = py::reinterpret_borrow<py::object>(obj);
  } else if (py::isinstance<py::array>(obj)) {
    raise_invalid(fmt::format("{} is a NumPy (host) array, but this cache's backend is the CUDA "
                              "backend: pass a CUDA tensor (__cuda_array_interface__ or "
                              "__dlpack__)",
                              name));
  } else if (has_attr(obj, "__cuda_array_interface__")) {
    const py::dict cai = obj.attr("__cuda_array_interface__");
    const std::string typestr = py::str(cai["typestr"]).cast<std::string>();
    if (typestr == "<f4") {
      t.dtype_ = DType::kF32;
    } else if (typestr == "<f2") {
      t.dtype_ = DType::kF16;
    } else {
      raise_invalid(fmt::format("{} has typestr {}; expected {}", name, typestr,
                                dtype_list(dtypes)));
    }
    for (const py::handle d : cai["shape"]) t.shape_.push_back(d.cast<int64_t>());
    if (cai.contains("strides") && !cai["strides"].is_none()) {
      for (const py::handle s : cai["strides"]) {
        strides.push_back(s.cast<int64_t>() / static_cast<int64_t>(dtype_bits(t.dtype_) / 8));
      }
    }
    if (cai.contains("mask") && !cai["mask"].is_none()) {
      raise_invalid(fmt::format("{} is a masked array", name));
    }
    const py::tuple data = cai["data"];
    t.data_ = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
    t.writable_ = !data[1].cast<bool>();
    t.source_ = py::reinterpret_borrow<py::object>(obj);
  } else if (has_attr(obj, "__dlpack__") && has_attr(obj, "__dlpack_device__")) {
    const py::tuple device = obj.attr("__dlpack_device__")();
    const auto device_type = device[0].cast<int32_t>();
    if (device_type != kDLCUDA && device_type != kDLCUDAManaged) {
      raise_invalid(fmt::format("{} is on DLPack device type {}; the CUDA backend takes CUDA "
                                "memory (device type {})",
                                name, device_type, kDLCUDA));
    }
    py::object capsule = obj.attr("__dlpack__")();
    auto* managed =
        static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    if (managed == nullptr) throw py::error_already_set();
    // The consumer owns the tensor from here on (the DLPack protocol): rename the capsule so
    // that its destructor leaves it alone, and call the deleter when done.
    PyCapsule_SetName(capsule.ptr(), "used_dltensor");
    t.dl_managed_ = managed;
    const DLTensor& dl = managed->dl_tensor;
    if (dl.dtype.lanes == 1 && dl.dtype.code == kDLFloat && dl.dtype.bits == 32) {
      t.dtype_ = DType::kF32;
    } else if (dl.dtype.lanes == 1 && dl.dtype.code == kDLFloat && dl.dtype.bits == 16) {
      t.dtype_ = DType::kF16;
    } else if (dl.dtype.lanes == 1 && dl.dtype.code == kDLBfloat && dl.dtype.bits == 16) {
      t.dtype_ = DType::kBF16;
    } else {
      raise_invalid(fmt::format("{} has DLPack dtype (code {}, bits {}, lanes {}); expected {}",
                                name, dl.dtype.code, dl.dtype.bits, dl.dtype.lanes,
                                dtype_list(dtypes)));
    }
    t.shape_.assign(dl.shape, dl.shape + dl.ndim);
    if (dl.strides) strides.assign(dl.strides, dl.strides + dl.ndim);
    t.data_ = static_cast<uint8_t*>(dl.data) + dl.byte_offset;
    t.writable_ = true;  // DLPack before 1.0 has no read-only flag
    t.source_ = py::reinterpret_borrow<py::object>(obj);
  } else {
    raise_invalid(fmt::format("{} must be a CUDA tensor (__cuda_array_interface__ or __dlpack__) "
                              "for the CUDA backend (got {})",
                              name, type_name(obj)));
  }

  if (std::find(dtypes.begin(), dtypes.end(), t.dtype_) == dtypes.end()) {
    raise_invalid(fmt::format("{} has dtype {}; expected {}", name, dtype_text(t.dtype_),
                              dtype_list(dtypes)));
  }
  if (static_cast<int>(t.shape_.size()) != ndim) {
    raise_invalid(fmt::format("{} must have {} dimensions (got shape {})", name, ndim,
                              shape_text(t.shape_)));
  }
  if (!c_contiguous(t.shape_, strides)) {
    raise_invalid(fmt::format("{} (shape {}) is not C-contiguous", name, shape_text(t.shape_)));
  }
  if (writable && !t.writable_) raise_invalid(fmt::format("{} is read-only", name));
  return t;
}

py::array new_host_array(DType dtype, const std::vector<int64_t>& shape) {
  py::tuple dims(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) dims[i] = py::int_(shape[i]);
  return py::module_::import("numpy").attr("zeros")(dims,
                                                    dtype == DType::kF16 ? "float16" : "float32");
}

namespace {

// Each element of a 1-D integer argument, as int64 (uint64 beyond int64 refused), to `f`.
template <typename F>
void for_each_integer(const py::handle& obj, const char* name, F&& f) {
  refuse_masked(obj, name);
  if (py::isinstance<py::array>(obj)) {
    auto array = py::reinterpret_borrow<py::array>(obj);
    const char kind = array.dtype().kind();
    if (kind != 'i' && kind != 'u') {
      raise_invalid(fmt::format("{} must hold integers (got dtype {})", name,
                                array.dtype().attr("name").cast<std::string>()));
    }
    if (array.ndim() != 1) {
      raise_invalid(fmt::format("{} must be 1-dimensional (got {} dimensions)", name,
                                array.ndim()));
    }
    if (kind == 'u') {
      auto values = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>(array);
      for (py::ssize_t i = 0; i < values.size(); ++i) {
        if (values.data()[i] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
          raise_invalid(fmt::format("{}[{}] = {} is too large", name, i, values.data()[i]));
        }
        f(static_cast<size_t>(i), static_cast<int64_t>(values.data()[i]));
      }
    } else {
      auto values = py::array_t<int64_t, py::array::c_style | py::array::forcecast>(array);
      for (py::ssize_t i = 0; i < values.size(); ++i) f(static_cast<size_t>(i), values.data()[i]);
    }
    return;
  }
  if (py::isinstance<py::str>(obj) || py::isinstance<py::bytes>(obj) ||
      !py::isinstance<py::sequence>(obj)) {
    raise_invalid(fmt::format("{} must be a sequence of integers or a NumPy integer array (got {})",
                              name, type_name(obj)));
  }
  size_t i = 0;
  const py::object numpy_bool = py::module_::import("numpy").attr("bool_");
  for (const py::handle item : obj) {
    // Python ints and anything with __index__ (NumPy integer scalars), not floats, strings or
    // bools (a NumPy bool array is refused too).
    if (PyBool_Check(item.ptr()) || py::isinstance(item, numpy_bool)) {
      raise_invalid(fmt::format("{}[{}] must be an integer (got bool)", name, i));
    }
    auto index = py::reinterpret_steal<py::object>(PyNumber_Index(item.ptr()));
    if (!index) {
      PyErr_Clear();
      raise_invalid(fmt::format("{}[{}] must be an integer (got {})", name, i, type_name(item)));
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow != 0) raise_invalid(fmt::format("{}[{}] is out of range", name, i));
    f(i++, static_cast<int64_t>(v));
  }
}

}  // namespace

template <typename T>
std::vector<T> index_vector(const py::handle& obj, const char* name) {
  // int64 arguments are slot mappings, where -1 skips a token.
  constexpr int64_t lowest = std::is_same_v<T, int64_t> ? -1 : 0;
  std::vector<T> out;
  // A 0-d NumPy array has __len__ but no length: for_each_integer names the problem.
  if (const Py_ssize_t n = PyObject_Length(obj.ptr()); n >= 0) {
    out.reserve(static_cast<size_t>(n));
  } else {
    PyErr_Clear();
  }
  for_each_integer(obj, name, [&](size_t i, int64_t v) {
    if (v < lowest ||
        (v > 0 && static_cast<uint64_t>(v) > static_cast<uint64_t>(std::numeric_limits<T>::max()))) {
      raise_invalid(fmt::format("{}[{}] = {} is outside [{}, {}]", name, i, v, lowest,
                                std::numeric_limits<T>::max()));
    }
    out.push_back(static_cast<T>(v));
  });
  return out;
}

template std::vector<int64_t> index_vector<int64_t>(const py::handle&, const char*);
template std::vector<uint32_t> index_vector<uint32_t>(const py::handle&, const char*);
template std::vector<uint64_t> index_vector<uint64_t>(const py::handle&, const char*);

std::pair<std::vector<uint32_t>, uint32_t> block_table_arg(const py::handle& obj, const char* name,
                                                           size_t rows) {
  constexpr uint32_t kPad = kInvalidBlockId.value;
  std::vector<std::vector<uint32_t>> table;
  if (py::isinstance<py::array>(obj)) {
    auto array = py::reinterpret_borrow<py::array>(obj);
    const char kind = array.dtype().kind();
    if ((kind != 'i' && kind != 'u') || array.ndim() != 2) {
      raise_invalid(fmt::format("{} must be a 2-D integer array [num_seqs, max_blocks] (got "
                                "dtype {}, {} dimensions)",
                                name, array.dtype().attr("name").cast<std::string>(), array.ndim()));
    }
    if (kind == 'u') {  // uint64 values past int64 would wrap to negative (to -1: padding)
      auto raw = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>(array);
      for (py::ssize_t i = 0; i < raw.size(); ++i) {
        if (raw.data()[i] >= kPad) {
          raise_invalid(fmt::format("{}[{}][{}] = {} is not a block id (-1 pads)", name,
                                    i / std::max<py::ssize_t>(raw.shape(1), 1),
                                    i % std::max<py::ssize_t>(raw.shape(1), 1), raw.data()[i]));
        }
      }
    }
    auto values = py::array_t<int64_t, py::array::c_style | py::array::forcecast>(array);
    const auto r = static_cast<size_t>(values.shape(0));
    const auto c = static_cast<size_t>(values.shape(1));
    table.assign(r, std::vector<uint32_t>(c));
    for (size_t i = 0; i < r; ++i) {
      for (size_t j = 0; j < c; ++j) {
        const int64_t v = values.data()[i * c + j];
        if (v < -1 || v >= static_cast<int64_t>(kPad)) {
          raise_invalid(fmt::format("{}[{}][{}] = {} is not a block id (-1 pads)", name, i, j, v));
        }
        table[i][j] = v < 0 ? kPad : static_cast<uint32_t>(v);
      }
    }
  } else if (py::isinstance<py::sequence>(obj) && !py::isinstance<py::str>(obj)) {
    size_t i = 0;
    for (const py::handle row : obj) {
      const std::string row_name = fmt::format("{}[{}]", name, i++);
      table.push_back(index_vector<uint32_t>(row, row_name.c_str()));
    }
  } else {
    raise_invalid(fmt::format("{} must be a list of block lists or a 2-D integer array (got {})",
                              name, type_name(obj)));
  }
  if (table.size() != rows) {
    raise_invalid(fmt::format("{} has {} rows; expected one per sequence ({})", name, table.size(),
                              rows));
  }
  uint32_t width = 1;
  for (const auto& row : table) width = std::max<uint32_t>(width, static_cast<uint32_t>(row.size()));
  std::vector<uint32_t> flat(rows * width, kPad);
  for (size_t i = 0; i < rows; ++i) std::copy(table[i].begin(), table[i].end(), &flat[i * width]);
  return {std::move(flat), width};
}

std::vector<uint32_t> tokens_arg(const py::handle& obj, const char* name) {
  return index_vector<uint32_t>(obj, name);
}

}  // namespace kvfabric::python
