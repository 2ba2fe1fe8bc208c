# FindNCCL: NVIDIA's collective communication library, as the imported target NCCL::nccl.
# Used by kvfabric's own build and installed with its package, whose config finds NCCL through
# find_dependency(NCCL) when kvfabric was built with the NCCL transport.
#
# Searches NCCL_ROOT (variable or environment), NCCL_HOME (environment), the CUDA toolkit's
# directories (when CUDAToolkit was found first) and the system's. Sets NCCL_FOUND,
# NCCL_VERSION, NCCL_INCLUDE_DIR and NCCL_LIBRARY (cache: pass either to pick an install).
find_path(NCCL_INCLUDE_DIR nccl.h
  HINTS ${CUDAToolkit_INCLUDE_DIRS} $ENV{NCCL_HOME}/include)
# The library beside the header first (an install under one prefix, e.g. /opt/nccl).
set(nccl_prefix)
if(NCCL_INCLUDE_DIR)
  get_filename_component(nccl_prefix "${NCCL_INCLUDE_DIR}" DIRECTORY)
endif()
find_library(NCCL_LIBRARY nccl
  HINTS ${nccl_prefix}/lib ${nccl_prefix}/lib64 ${CUDAToolkit_LIBRARY_DIR} $ENV{NCCL_HOME}/lib
        $ENV{NCCL_HOME}/lib64)
mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)

if(NCCL_INCLUDE_DIR AND EXISTS "${NCCL_INCLUDE_DIR}/nccl.h")
  set(nccl_version_parts)
  foreach(part MAJOR MINOR PATCH)
    file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" nccl_line REGEX "^#define NCCL_${part} +[0-9]+")
    if(nccl_line MATCHES "NCCL_${part} +([0-9]+)")
      list(APPEND nccl_version_parts ${CMAKE_MATCH_1})
    endif()
  endforeach()
  list(LENGTH nccl_version_parts nccl_version_length)
  if(nccl_version_length EQUAL 3)
    list(JOIN nccl_version_parts "." NCCL_VERSION)
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
