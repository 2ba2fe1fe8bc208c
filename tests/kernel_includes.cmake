# ctest driver (kernels_include_only_views): the kernels see plain data only. Every kvfabric header
# a file under KERNELS_DIR includes, directly or through another kvfabric header, must be one of
# the header-only view and argument headers below; the Backend interface (backend.h) and every
# other module's classes stay out of kernels/ (DESIGN.md §4: backend -> kernels is the only edge).
#   cmake -DKERNELS_DIR=<dir> -DINCLUDE_DIR=<repo>/include -P kernel_includes.cmake
cmake_minimum_required(VERSION 3.25)  # IN_LIST, list(POP_FRONT)
set(allowed_prefixes "kvfabric/common/" "kvfabric/quant/")
set(allowed_headers "kvfabric/backend/paged_kv_view.h" "kvfabric/backend/kernel_args.h"
                    "kvfabric/block/token_copy.h")

function(kvf_allowed header out)
  set(ok FALSE)
  if(header IN_LIST allowed_headers)
    set(ok TRUE)
  endif()
  foreach(prefix ${allowed_prefixes})
    string(FIND "${header}" "${prefix}" at)
    if(at EQUAL 0)
      set(ok TRUE)
    endif()
  endforeach()
  set(${out} ${ok} PARENT_SCOPE)
endfunction()

# The kvfabric headers `file` includes, as "kvfabric/..." paths.
function(kvf_kvfabric_includes file out)
  file(STRINGS "${file}" lines REGEX "^[ \t]*#[ \t]*include[ \t]*[\"<]kvfabric/")
  set(found)
  foreach(line ${lines})
    string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]*[\"<]([^\">]+)[\">].*$" "\\1" header "${line}")
    list(APPEND found "${header}")
  endforeach()
  set(${out} ${found} PARENT_SCOPE)
endfunction()

if(NOT IS_DIRECTORY "${KERNELS_DIR}" OR NOT IS_DIRECTORY "${INCLUDE_DIR}")
  message(FATAL_ERROR "kernel_includes.cmake needs -DKERNELS_DIR=<dir> -DINCLUDE_DIR=<dir>")
endif()
file(GLOB_RECURSE sources "${KERNELS_DIR}/*.h" "${KERNELS_DIR}/*.cuh" "${KERNELS_DIR}/*.cu"
                          "${KERNELS_DIR}/*.in" "${KERNELS_DIR}/*.cc")
set(errors)
set(checked)      # headers whose own includes were followed already
set(worklist)     # "header|who includes it"
foreach(src ${sources})
  file(RELATIVE_PATH name "${KERNELS_DIR}" "${src}")
  kvf_kvfabric_includes("${src}" headers)
  foreach(header ${headers})
    list(APPEND worklist "${header}|${name}")
  endforeach()
endforeach()
while(worklist)
  list(POP_FRONT worklist item)
  string(REPLACE "|" ";" parts "${item}")
  list(GET parts 0 header)
  list(GET parts 1 who)
  kvf_allowed("${header}" ok)
  if(NOT ok)
    list(APPEND errors "  ${who} includes ${header}")
    continue()
  endif()
  if(header IN_LIST checked OR NOT EXISTS "${INCLUDE_DIR}/${header}")
    continue()
  endif()
  list(APPEND checked "${header}")
  kvf_kvfabric_includes("${INCLUDE_DIR}/${header}" nested)
  foreach(next ${nested})
    list(APPEND worklist "${next}|${who} -> ${header}")
  endforeach()
endwhile()

if(errors)
  list(JOIN errors "\n" errors)
  list(JOIN allowed_headers ", " allowed)
  message(FATAL_ERROR "kernels may include only the plain view and argument headers (${allowed}) "
                      "and kvfabric/common, kvfabric/quant; found:\n${errors}")
endif()
list(LENGTH sources n)
message(STATUS "kernel includes: ${n} files under ${KERNELS_DIR}, only view and argument headers")
