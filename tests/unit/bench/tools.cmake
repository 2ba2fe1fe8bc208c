# kvfabric-bench's progress display and every routine's figure (launch/plot.py), label tools.
# The driver and plot.py use the system python3, where Debian's python3-matplotlib lives.
find_program(KVF_SYSTEM_PYTHON3 python3 PATHS /usr/bin NO_DEFAULT_PATH)
if(NOT KVF_SYSTEM_PYTHON3)
  message(STATUS "kvfabric: no /usr/bin/python3: the plot and progress tests are not added")
  return()
endif()
set(kvf_tools_driver ${CMAKE_CURRENT_LIST_DIR}/tools_test.py)
set(kvf_plot ${PROJECT_SOURCE_DIR}/launch/plot.py)

add_test(NAME kvfabric-bench_progress
         COMMAND ${KVF_SYSTEM_PYTHON3} ${kvf_tools_driver} progress $<TARGET_FILE:kvfabric-bench>
                 ${CMAKE_CURRENT_BINARY_DIR}/tools_test/progress)
set_tests_properties(kvfabric-bench_progress PROPERTIES LABELS tools TIMEOUT 120)
add_test(NAME kvfabric-bench_refusals
         COMMAND ${KVF_SYSTEM_PYTHON3} ${kvf_tools_driver} refusals $<TARGET_FILE:kvfabric-bench>
                 ${CMAKE_CURRENT_BINARY_DIR}/tools_test/refusals)
set_tests_properties(kvfabric-bench_refusals PROPERTIES LABELS tools TIMEOUT 300)

set(kvf_plot_cases alloc replay replay-dp scale attention quant copy seed-ops compress config unknown)
foreach(case ${kvf_plot_cases})
  add_test(NAME plot_${case}
           COMMAND ${KVF_SYSTEM_PYTHON3} ${kvf_tools_driver} plot $<TARGET_FILE:kvfabric-bench>
                   ${kvf_plot} ${case} ${CMAKE_CURRENT_BINARY_DIR}/tools_test/${case})
  set_tests_properties(plot_${case} PROPERTIES LABELS tools TIMEOUT 120)
endforeach()
if(KVF_HAVE_MPI)
  add_test(NAME plot_transfer
           COMMAND ${KVF_SYSTEM_PYTHON3} ${kvf_tools_driver} plot $<TARGET_FILE:kvfabric-bench>
                   ${kvf_plot} transfer ${CMAKE_CURRENT_BINARY_DIR}/tools_test/transfer
                   ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} 2 ${KVF_MPIEXEC_OVERSUBSCRIBE})
  set_tests_properties(plot_transfer PROPERTIES LABELS tools TIMEOUT 120 PROCESSORS 2
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
  add_test(NAME plot_compression
           COMMAND ${KVF_SYSTEM_PYTHON3} ${kvf_tools_driver} plot $<TARGET_FILE:kvfabric-bench>
                   ${kvf_plot} compression ${CMAKE_CURRENT_BINARY_DIR}/tools_test/compression
                   ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} 4 ${KVF_MPIEXEC_OVERSUBSCRIBE})
  set_tests_properties(plot_compression PROPERTIES LABELS tools TIMEOUT 180 PROCESSORS 2
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1")
endif()
