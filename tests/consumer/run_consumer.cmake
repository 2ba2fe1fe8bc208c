# ctest driver: builds tests/consumer against kvfabric and runs it.
#   MODE=find_package     installs this build tree to WORK_DIR/prefix and uses find_package();
#                         then checks the installed configs/ and kvfabric.pc, and builds the same
#                         program with `pkg-config --cflags --libs kvfabric` alone
#   MODE=add_subdirectory adds the source tree to the consumer build
file(REMOVE_RECURSE ${WORK_DIR})
set(consumer_src ${SOURCE_DIR}/tests/consumer)
if(MODE STREQUAL "find_package")
  execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix
                  RESULT_VARIABLE rc OUTPUT_QUIET)
  if(rc)
    message(FATAL_ERROR "cmake --install failed: ${rc}")
  endif()
  set(configure_args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
  # Every shipped config is installed.
  file(GLOB shipped RELATIVE ${SOURCE_DIR}/configs ${SOURCE_DIR}/configs/*)
  foreach(f ${shipped})
    if(NOT EXISTS ${WORK_DIR}/prefix/${INSTALL_DATADIR}/kvfabric/configs/${f})
      message(FATAL_ERROR "configs/${f} was not installed to ${INSTALL_DATADIR}/kvfabric/configs")
    endif()
  endforeach()
  set(pc_dir ${WORK_DIR}/prefix/${INSTALL_LIBDIR}/pkgconfig)
  if(NOT EXISTS ${pc_dir}/kvfabric.pc)
    message(FATAL_ERROR "kvfabric.pc was not installed to ${INSTALL_LIBDIR}/pkgconfig")
  endif()
  find_program(pkg_config NAMES pkg-config pkgconf REQUIRED)
  set(ENV{PKG_CONFIG_PATH} "${pc_dir}:$ENV{PKG_CONFIG_PATH}")
  execute_process(COMMAND ${pkg_config} --cflags --libs kvfabric
                  RESULT_VARIABLE rc OUTPUT_VARIABLE pc_flags ERROR_VARIABLE pc_err
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(rc)
    message(FATAL_ERROR "pkg-config --cflags --libs kvfabric failed: ${pc_err}")
  endif()
  message(STATUS "pkg-config --cflags --libs kvfabric: ${pc_flags}")
  execute_process(COMMAND ${pkg_config} --variable=includedir kvfabric
                  OUTPUT_VARIABLE pc_include OUTPUT_STRIP_TRAILING_WHITESPACE)
  execute_process(COMMAND ${pkg_config} --variable=configsdir kvfabric
                  OUTPUT_VARIABLE pc_configs OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT EXISTS ${pc_include}/kvfabric/kvfabric.h OR NOT EXISTS ${pc_configs}/tiny-cpu.yaml)
    message(FATAL_ERROR "kvfabric.pc's includedir (${pc_include}) or configsdir (${pc_configs}) "
                        "is not where the files were installed")
  endif()
  foreach(expected "-I${pc_include}" "-lkvfabric_server" "-lkvfabric_common")
    string(FIND " ${pc_flags} " " ${expected} " at)
    if(at EQUAL -1)
      message(FATAL_ERROR "pkg-config --cflags --libs kvfabric lacks ${expected}: ${pc_flags}")
    endif()
  endforeach()
  # The consumer program, compiled and linked with nothing but the pkg-config flags.
  separate_arguments(pc_args UNIX_COMMAND "${pc_flags}")
  file(MAKE_DIRECTORY ${WORK_DIR}/pkg-config)
  execute_process(COMMAND ${CXX_COMPILER} -std=c++20 -O1 ${consumer_src}/main.cc ${pc_args}
                          -o ${WORK_DIR}/pkg-config/consumer
                  RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "building the consumer with the pkg-config flags failed: ${rc}")
  endif()
  execute_process(COMMAND ${WORK_DIR}/pkg-config/consumer RESULT_VARIABLE rc OUTPUT_QUIET)
  if(rc)
    message(FATAL_ERROR "the consumer built with the pkg-config flags failed: ${rc}")
  endif()
  message(STATUS "the consumer built with pkg-config's flags runs")
  list(APPEND configure_args -DCMAKE_BUILD_TYPE=Release)
else()
  # The whole library is compiled again here: unoptimized, which halves the time this test takes
  # and checks only what it is for (the source tree builds and links inside another project).
  set(configure_args -DKVFABRIC_SOURCE_DIR=${SOURCE_DIR} -DKVF_ENABLE_CUDA=OFF -DKVF_ENABLE_MPI=OFF
                     -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-O0)
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${consumer_src} -B ${WORK_DIR}/build -G ${GENERATOR}
                        ${configure_args}
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the consumer failed: ${rc}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/build RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the consumer failed: ${rc}")
endif()
execute_process(COMMAND ${WORK_DIR}/build/consumer RESULT_VARIABLE rc OUTPUT_VARIABLE out)
message(STATUS "${out}")
if(rc)
  message(FATAL_ERROR "the consumer failed: ${rc}")
endif()
