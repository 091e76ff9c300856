# ctest driver of one compile-fail test (see tests/compile_fail/CMakeLists.txt).
#   cmake -DBUILD_DIR=<dir> -DCONFIG=<cfg> -DTARGET=<object target> -DSOURCE=<file.cpp> -P longmemCompileFail.cmake
# Passes when building TARGET fails and the output matches the `// EXPECT-ERROR: <regex>` line of SOURCE.
foreach(_var BUILD_DIR TARGET SOURCE)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "longmemCompileFail.cmake: -D${_var}=... is required")
  endif()
endforeach()
file(STRINGS "${SOURCE}" _lines REGEX "^// EXPECT-ERROR: ")
list(LENGTH _lines _count)
if(NOT _count EQUAL 1)
  message(FATAL_ERROR "${SOURCE}: expected exactly one `// EXPECT-ERROR: <regex>` line, found ${_count}")
endif()
string(REGEX REPLACE "^// EXPECT-ERROR: " "" _regex "${_lines}")
string(STRIP "${_regex}" _regex)

set(_config_args "")
if(CONFIG)
  set(_config_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" ${_config_args} --target "${TARGET}"
                RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _out)
if(_rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must fail with an error matching: ${_regex}")
endif()
if(NOT _out MATCHES "${_regex}")
  message(FATAL_ERROR "${SOURCE} failed to compile, but no output matched `${_regex}`; output:\n${_out}")
endif()
message(STATUS "${SOURCE} failed to compile as expected (matched `${_regex}`)")
