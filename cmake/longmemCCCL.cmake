# Makes sure CCCL::CCCL (Thrust, CUB, libcu++) exists once CUDAToolkit has been found.
# CUDA 13 ships them under include/cccl with a CMake package in lib64/cmake/cccl; older
# toolkits keep them directly under include/. Used by the build and by the installed config.
if(NOT TARGET CCCL::CCCL)
  find_package(CCCL CONFIG QUIET
    HINTS "${CUDAToolkit_LIBRARY_DIR}/cmake" "${CUDAToolkit_TARGET_DIR}/lib64/cmake"
          "${CUDAToolkit_LIBRARY_ROOT}/lib64/cmake")
endif()
if(NOT TARGET CCCL::CCCL)
  add_library(CCCL::CCCL INTERFACE IMPORTED GLOBAL)
  foreach(_longmem_inc IN LISTS CUDAToolkit_INCLUDE_DIRS)
    if(EXISTS "${_longmem_inc}/cccl/cub/cub.cuh")
      target_include_directories(CCCL::CCCL INTERFACE "${_longmem_inc}/cccl")
    endif()
  endforeach()
  unset(_longmem_inc)
endif()
