# ctest driver for the consumer projects (see tests/CMakeLists.txt).
#   KIND=find_package      install longmem from LONGMEM_BINARY_DIR into WORK_DIR/prefix, then
#                          configure, build and run tests/consumers/find_package against it
#   KIND=add_subdirectory  configure, build and run tests/consumers/add_subdirectory on LONGMEM_SOURCE_DIR
# Each step's output is shown when it fails.
foreach(_var KIND WORK_DIR LONGMEM_SOURCE_DIR LONGMEM_BINARY_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "run_consumer.cmake: -D${_var}=... is required")
  endif()
endforeach()

function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
  if(NOT _rc EQUAL 0)
    string(REPLACE ";" " " _cmd "${ARGN}")
    message(FATAL_ERROR "consumer ${KIND}: ${what} failed (exit ${_rc}).\ncommand: ${_cmd}\n${_out}")
  endif()
  set(step_output "${_out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(_build "${WORK_DIR}/build")
set(_config Release)
if(CONFIG)
  set(_config "${CONFIG}")
endif()
set(_configure "${CMAKE_COMMAND}" -G "${GENERATOR}" -B "${_build}" -DCMAKE_BUILD_TYPE=${_config}
               -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
if(CUDA_COMPILER)
  # Lets find_package(CUDAToolkit) and check_language(CUDA) find the same toolkit as the main build.
  get_filename_component(_cuda_bin "${CUDA_COMPILER}" DIRECTORY)
  get_filename_component(_cuda_root "${_cuda_bin}" DIRECTORY)
  list(APPEND _configure -DCUDAToolkit_ROOT=${_cuda_root})
endif()

if(KIND STREQUAL "find_package")
  set(_prefix "${WORK_DIR}/prefix")
  run_step("installing longmem into ${_prefix}"
           "${CMAKE_COMMAND}" --install "${LONGMEM_BINARY_DIR}" --prefix "${_prefix}" --config ${_config})
  foreach(_file include/longmem/tensor.hpp lib/cmake/longmem/longmemConfig.cmake
                lib/cmake/longmem/longmemConfigVersion.cmake lib/cmake/longmem/longmemTargets.cmake)
    if(NOT EXISTS "${_prefix}/${_file}")
      message(FATAL_ERROR "consumer find_package: the install has no ${_file}")
    endif()
  endforeach()
  set(_expect_cuda OFF)
  if(CUDA_ENABLED)
    set(_expect_cuda ON)
  endif()
  run_step("configuring" ${_configure} -S "${LONGMEM_SOURCE_DIR}/tests/consumers/find_package"
           -DCMAKE_PREFIX_PATH=${_prefix} -DEXPECT_CUDA=${_expect_cuda})
elseif(KIND STREQUAL "add_subdirectory")
  set(_cuda_mode OFF)
  if(CUDA_ENABLED)
    set(_cuda_mode AUTO)
  endif()
  set(_openmp ON)
  if(DEFINED OPENMP)
    set(_openmp ${OPENMP})
  endif()
  run_step("configuring" ${_configure} -S "${LONGMEM_SOURCE_DIR}/tests/consumers/add_subdirectory"
           -DLONGMEM_SOURCE_DIR=${LONGMEM_SOURCE_DIR} -DLONGMEM_CUDA=${_cuda_mode} -DLONGMEM_OPENMP=${_openmp})
else()
  message(FATAL_ERROR "run_consumer.cmake: KIND must be find_package or add_subdirectory, got '${KIND}'")
endif()

run_step("building" "${CMAKE_COMMAND}" --build "${_build}" --config ${_config})
run_step("running the consumer" "${_build}/consumer")
message(STATUS "consumer ${KIND}: ${step_output}")
if(NOT step_output MATCHES "logits \\(16, 256\\)" OR NOT step_output MATCHES "memory holds 64 tokens")
  message(FATAL_ERROR "consumer ${KIND}: expected it to print `logits (16, 256)` and `memory holds 64 tokens`, got: ${step_output}")
endif()
if(EXISTS "${_build}/consumer_cuda")
  run_step("running the CUDA consumer" "${_build}/consumer_cuda")
  message(STATUS "consumer ${KIND} (CUDA): ${step_output}")
endif()
