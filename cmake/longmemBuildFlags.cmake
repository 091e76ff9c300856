# Flags for longmem's own targets (tests, examples, benchmarks). Users of the library get
# none of these: the `longmem` target carries only its include path, C++20 and dependencies.

# -Wall -Wextra -Werror for C++ sources; host-compiler warnings (not errors) for CUDA sources,
# since Thrust/CUB headers are not ours to fix.
function(longmem_target_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Werror>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
endfunction()

# LONGMEM_SANITIZE (e.g. "address,undefined") on C++ sources; a report aborts the test.
function(longmem_target_sanitizers target)
  if(NOT LONGMEM_SANITIZE)
    return()
  endif()
  set(_flags -fsanitize=${LONGMEM_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${_flags}>)
  target_link_options(${target} PRIVATE $<$<LINK_LANGUAGE:CXX>:${_flags}>)
endfunction()

# -O3 (and -march=native unless `portable` is true) whatever CMAKE_BUILD_TYPE says.
function(longmem_target_optimize target portable)
  set(_cxx -O3)
  set(_cuda -O3)
  if(NOT portable)
    list(APPEND _cxx -march=native)
    list(APPEND _cuda -Xcompiler=-march=native)
  endif()
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:${_cxx}>
    $<$<COMPILE_LANGUAGE:CUDA>:${_cuda}>)
endfunction()
