# Flags for longmem's own targets (tests, examples, benchmarks). Users of the library get
# none of these: the `longmem` target carries only its include path, C++20 and dependencies.

# -Wall -Wextra -Werror for C++ sources; host-compiler warnings (not errors) for CUDA sources,
# since Thrust/CUB headers are not ours to fix.
function(longmem_target_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Werror>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
  # GCC 12 at -O2/-O3 reports a false -Wrestrict inside libstdc++ for `"text" + std::string&&`
  # (GCC bug 105329, fixed in GCC 13); it is not a defect of ours, so it must not fail the build.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12
     AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wno-restrict>)
  endif()
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

# -O3 (and -march=native unless `portable` is true) whatever CMAKE_BUILD_TYPE says; not in a
# sanitizer build, which keeps its build type's flags (the sanitize preset's -O1 -g1): at -O3 with
# ASan and UBSan, longmem-train alone took 20 minutes to compile on 2 cores.
function(longmem_target_optimize target portable)
  if(LONGMEM_SANITIZE)
    return()
  endif()
  set(_cxx -O3)
  set(_cuda -O3)
  if(NOT portable)
    list(APPEND _cxx -march=native)
    list(APPEND _cuda -Xcompiler=-march=native)
    # GCC 12's AVX-512 intrinsics (`__m512 __Y = __Y;` in _mm512_undefined_*) raise a false
    # -Wmaybe-uninitialized once inlined into Eigen kernels (GCC bug 105593, fixed in GCC 13).
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12
       AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
      list(APPEND _cxx -Wno-maybe-uninitialized)
    endif()
  endif()
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:${_cxx}>
    $<$<COMPILE_LANGUAGE:CUDA>:${_cuda}>)
endfunction()
