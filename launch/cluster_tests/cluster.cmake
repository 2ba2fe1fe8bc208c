# launch/cluster's tests (pytest with Debian's python3): the dry runs, label tools (they read the
# config through kvfabric-bench), and a real 4-rank replay under mpirun, label mpi. Included from
# tests/CMakeLists.txt when the tools are built without a sanitizer (build-asan builds only the
# unit-test binaries, and the launcher needs kvfabric-bench and kvfabric-serve).
find_program(KVF_SYSTEM_PYTHON3 python3 PATHS /usr/bin NO_DEFAULT_PATH)
if(NOT KVF_SYSTEM_PYTHON3)
  message(STATUS "kvfabric: no /usr/bin/python3: launch/cluster's tests are not added")
  return()
endif()
set(kvf_cluster_tests ${CMAKE_CURRENT_LIST_DIR})

add_test(NAME launch_cluster_dry_run
         COMMAND ${KVF_SYSTEM_PYTHON3} -m pytest -q -p no:cacheprovider
                 ${kvf_cluster_tests}/test_cluster.py)
set_tests_properties(launch_cluster_dry_run PROPERTIES LABELS tools TIMEOUT 120
  ENVIRONMENT "KVF_BIN_DIR=$<TARGET_FILE_DIR:kvfabric-serve>")

if(KVF_HAVE_MPI)
  add_test(NAME launch_cluster_run
           COMMAND ${KVF_SYSTEM_PYTHON3} -m pytest -q -p no:cacheprovider
                   ${kvf_cluster_tests}/test_cluster_run.py)
  # 4 ranks: PROCESSORS keeps ctest -j from running other tests beside them.
  set_tests_properties(launch_cluster_run PROPERTIES LABELS mpi PROCESSORS 4 TIMEOUT 180
    ENVIRONMENT "KVF_BIN_DIR=$<TARGET_FILE_DIR:kvfabric-serve>")
endif()
