// How fast can an H100 add fp32 dQ tiles into global memory? A fused dK/dV/dQ backward (five
// products instead of seven) would add one 64x128 fp32 dQ tile per (query block, key block)
// pair: 1.55 M pairs, 50 GB of reductions at T16-train. This measures that traffic alone, with
// the pairs' access pattern: each CTA takes a key block's inverse list (random query blocks of
// one head) and adds a tile to each. Standalone, no torch:
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a tools/device/dq_atomics.cu -o dq_atomics
//   ./dq_atomics
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <cuda_runtime.h>

#include "cuda_check.h"

constexpr int kRows = 64, kDim = 128, kThreads = 256;

// One CTA per (head, key block): adds a constant tile to each query block of its list.
template <bool kVector>
__global__ void __launch_bounds__(kThreads) add_tiles(float* dq, const int* lists, int per_list, int nq, int nk) {
  const int head = blockIdx.y, kb = blockIdx.x;
  const int* list = lists + (static_cast<long long>(head) * nk + kb) * per_list;
  for (int i = 0; i < per_list; ++i) {
    float* tile = dq + (static_cast<long long>(head) * nq + list[i]) * kRows * kDim;
    if constexpr (kVector) {
      for (int e = threadIdx.x * 4; e < kRows * kDim; e += kThreads * 4)
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(tile + e), "f"(1.f), "f"(1.f), "f"(1.f),
                     "f"(1.f)
                     : "memory");
    } else {
      for (int e = threadIdx.x; e < kRows * kDim; e += kThreads) atomicAdd(tile + e, 1.f);
    }
  }
}

// The same bytes as plain 16-byte stores (the floor a reduction cannot beat).
__global__ void __launch_bounds__(kThreads) store_tiles(float* dq, const int* lists, int per_list, int nq, int nk) {
  const int head = blockIdx.y, kb = blockIdx.x;
  const int* list = lists + (static_cast<long long>(head) * nk + kb) * per_list;
  for (int i = 0; i < per_list; ++i) {
    float4* tile = reinterpret_cast<float4*>(dq + (static_cast<long long>(head) * nq + list[i]) * kRows * kDim);
    for (int e = threadIdx.x; e < kRows * kDim / 4; e += kThreads) tile[e] = make_float4(1.f, 1.f, 1.f, 1.f);
  }
}

int main() {
  // T16-train: 32 heads, 880 query and key blocks, 55 per list (each key block is chosen by 55
  // query blocks on average).
  const int heads = 32, nq = 880, nk = 880, per_list = 55;
  std::mt19937 rng(0);
  std::vector<int> lists(static_cast<size_t>(heads) * nk * per_list);
  for (auto& x : lists) x = static_cast<int>(rng() % nq);
  float* dq;
  int* dlists;
  const size_t dq_bytes = static_cast<size_t>(heads) * nq * kRows * kDim * 4;
  CHECK(cudaMalloc(&dq, dq_bytes));
  CHECK(cudaMalloc(&dlists, lists.size() * 4));
  CHECK(cudaMemcpy(dlists, lists.data(), lists.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(dq, 0, dq_bytes));
  const dim3 grid(nk, heads);
  const double bytes = static_cast<double>(heads) * nk * per_list * kRows * kDim * 4;
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  auto time = [&](const char* name, auto launch) {
    launch();
    CHECK(cudaDeviceSynchronize());
    float best = 1e30f;
    for (int r = 0; r < 5; ++r) {
      CHECK(cudaEventRecord(a));
      launch();
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      best = ms < best ? ms : best;
    }
    std::printf("%-28s %8.2f ms  %6.2f TB/s of tiles (%.1f GB)\n", name, best, bytes / best / 1e9, bytes / 1e9);
  };
  time("red.global.add.v4.f32", [&] { add_tiles<true><<<grid, kThreads>>>(dq, dlists, per_list, nq, nk); });
  time("atomicAdd (scalar)", [&] { add_tiles<false><<<grid, kThreads>>>(dq, dlists, per_list, nq, nk); });
  time("plain 16-byte stores", [&] { store_tiles<<<grid, kThreads>>>(dq, dlists, per_list, nq, nk); });
  return 0;
}
