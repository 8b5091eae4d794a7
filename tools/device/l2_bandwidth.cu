// How fast the SMs can read 16 KB tiles out of L2: the ceiling under any kernel that gathers
// one 64x128 bf16 K or V tile per (query block, key block) pair. Standalone (no torch).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a tools/device/l2_bandwidth.cu \
//        -o l2_bandwidth && ./l2_bandwidth
//
// Every CTA reads whole tiles chosen by a hash of (CTA, step) from a buffer of `mb` MB, with
// 16-byte loads that skip L1 (ld.global.cg), and folds them into one word so that nothing is
// optimised away. A buffer that fits L2 measures L2 -> SM bandwidth; a large one, DRAM.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda_check.h"

namespace {

constexpr int kTileBytes = 16384;

__global__ void __launch_bounds__(256) read_tiles(const uint4* __restrict__ buf, int tiles, int steps,
                                                  unsigned* __restrict__ sink) {
  unsigned acc = 0;
  for (int s = 0; s < steps; ++s) {
    uint32_t h = (blockIdx.x * 2654435761u) ^ (s * 40503u + 0x9e3779b9u);
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const uint4* tile = buf + static_cast<size_t>(h % tiles) * (kTileBytes / 16);
#pragma unroll
    for (int i = 0; i < kTileBytes / 16 / 256; ++i) {
      const uint4 x = __ldcg(tile + i * 256 + threadIdx.x);
      acc ^= x.x ^ x.y ^ x.z ^ x.w;
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

}  // namespace

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  unsigned* sink;
  CHECK(cudaMalloc(&sink, 4));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int mb : {8, 24, 43, 86, 2048}) {
    const int tiles = static_cast<int>((static_cast<size_t>(mb) << 20) / kTileBytes);
    uint4* buf;
    CHECK(cudaMalloc(&buf, static_cast<size_t>(tiles) * kTileBytes));
    CHECK(cudaMemset(buf, 1, static_cast<size_t>(tiles) * kTileBytes));
    for (int per_sm : {4, 8}) {
      const int ctas = sms * per_sm, steps = 2048;
      read_tiles<<<ctas, 256>>>(buf, tiles, steps, sink);  // warm-up (fills L2)
      CHECK(cudaGetLastError());
      std::vector<float> t;
      for (int r = 0; r < 5; ++r) {
        CHECK(cudaEventRecord(a));
        read_tiles<<<ctas, 256>>>(buf, tiles, steps, sink);
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        float ms = 0.f;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms);
      }
      std::sort(t.begin(), t.end());
      const double bytes = static_cast<double>(ctas) * steps * kTileBytes;
      std::printf("buffer %5d MB, %3d CTAs of 256 threads per SM: %.3f ms, %.2f TB/s\n", mb, per_sm, t[2],
                  bytes / t[2] / 1e9);
    }
    CHECK(cudaFree(buf));
  }
  return 0;
}
