# FindNCCL: NVIDIA's collective communication library, as the imported target NCCL::nccl.
# Used by kvfabric's own build and installed with its package, whose config finds NCCL through
# find_dependency(NCCL) when kvfabric was built with the NCCL transport.
#
# Searches NCCL_ROOT (variable or environment), NCCL_HOME (environment), the CUDA toolkit's
# directories (when CUDAToolkit was found first) and the system's. Sets NCCL_FOUND,
# NCCL_VERSION, NCCL_INCLUDE_DIR and NCCL_LIBRARY (cache: pass either to pick an install).
find_path(NCCL_INCLUDE_DIR nccl.h
  HINTS ${CUDAToolkit_INCLUDE_DIRS} $ENV{NCCL_HOME}/include)
find_library(NCCL_LIBRARY nccl
  HINTS ${CUDAToolkit_LIBRARY_DIR} $ENV{NCCL_HOME}/lib $ENV{NCCL_HOME}/lib64)
mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)

if(NCCL_INCLUDE_DIR AND EXISTS "${NCCL_INCLUDE_DIR}/nccl.h")
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" nccl_version_lines
       REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) +[0-9]+")
  foreach(part MAJOR MINOR PATCH)
    string(REGEX REPLACE ".*#define NCCL_${part} +([0-9]+).*" "\\1" nccl_${part} "${nccl_version_lines}")
  endforeach()
  if(nccl_MAJOR MATCHES "^[0-9]+$" AND nccl_MINOR MATCHES "^[0-9]+$" AND nccl_PATCH MATCHES "^[0-9]+$")
    set(NCCL_VERSION "${nccl_MAJOR}.${nccl_MINOR}.${nccl_PATCH}")
  endif()
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NCCL
  REQUIRED_VARS NCCL_LIBRARY NCCL_INCLUDE_DIR
  VERSION_VAR NCCL_VERSION)

if(NCCL_FOUND AND NOT TARGET NCCL::nccl)
  add_library(NCCL::nccl UNKNOWN IMPORTED)
  set_target_properties(NCCL::nccl PROPERTIES
    IMPORTED_LOCATION "${NCCL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
endif()
