// CHECK(call) for the standalone device tools (fwd_phases.cu, dq_atomics.cu): a failing CUDA
// runtime call prints where and why, and exits.
#pragma once

#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

#define CHECK(x)                                                                     \
  do {                                                                               \
    const cudaError_t e = (x);                                                       \
    if (e != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)
