// Tensor throughput of mma.sync m16n8k16 (bf16 in, fp32 accumulate) by warps per SM: how many
// warps must issue products at once to keep an SM's tensor pipes busy. The sm80 kernels run
// 8 warps per SM (255 registers), so this says how much of the tensor rate they can reach
// while some of their warps are doing something else (softmax, copies, barriers).
//
//   nvcc -O3 -arch=sm_90a -Icsrc/include -Itools/device -o hmma_rate tools/device/hmma_rate.cu
//   ./hmma_rate
//
// One CTA per SM; a CTA of 32 * w threads gives w warps per SM. Each warp issues kIters rounds
// of kChains independent products (accumulator chains), operands in registers. The second table
// puts a phase of dependent FMAs after every 128 products; past ~256 FMAs a round it measures
// the shared issue port more than the tensor pipe (on H100, 8 to 16 warps then give the same).
#include <cstdio>

#include "bsa/api.h"
#include "bsa/ptx.cuh"
#include "cuda_check.h"

// A warp's products: fixed operands in registers (from `seed`), kChains accumulators.
template <int kChains>
struct Chains {
  uint32_t a[4], b[2];
  float acc[kChains][4] = {};
  __device__ explicit Chains(uint32_t seed) {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = seed * (threadIdx.x + i);
    b[0] = seed ^ threadIdx.x;
    b[1] = seed + threadIdx.x;
  }
  __device__ void round() {  // one product per chain
#pragma unroll
    for (int c = 0; c < kChains; ++c) bsa::mma_16816<bsa::DType::kBFloat16>(acc[c], a, b[0], b[1]);
  }
  __device__ void keep(float extra, float* out) const {  // keeps the products alive
    float s = extra;
#pragma unroll
    for (int c = 0; c < kChains; ++c) s += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
    if (s == 1.2345f) out[threadIdx.x] = s;
  }
};

template <int kChains>
__global__ void hmma_loop(float* out, int iters, uint32_t seed) {
  Chains<kChains> ch(seed);
  for (int it = 0; it < iters; ++it) ch.round();
  ch.keep(0.f, out);
}

// The same, with every round of 8 x kChains products followed by a phase of `scalar` dependent
// FMAs in 4 chains (a stand-in for the softmax between a kernel's two products).
template <int kChains>
__global__ void hmma_phases(float* out, int iters, int scalar, uint32_t seed) {
  Chains<kChains> ch(seed);
  float x[4] = {1.f, 2.f, 3.f, 4.f};
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int r = 0; r < 8; ++r) ch.round();
    for (int j = 0; j < scalar / 4; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) x[i] = fmaf(x[i], 0.999f, ch.acc[i][0] * 1e-9f);
    }
  }
  ch.keep(x[0] + x[1] + x[2] + x[3], out);
}

// Milliseconds of `reps` back-to-back launches of `launch` (after one warm-up launch).
template <typename Launch>
float time_ms(Launch launch, int reps) {
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  CHECK(cudaEventRecord(e0));
  for (int r = 0; r < reps; ++r) launch();
  CHECK(cudaEventRecord(e1));
  CHECK(cudaEventSynchronize(e1));
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, e0, e1));
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  return ms;
}

void run_phases(int sms, int warps, int scalar, float* out) {
  const int iters = 512;
  hmma_phases<16><<<sms, 32 * warps>>>(out, 4, scalar, 3);
  CHECK(cudaGetLastError());
  const float ms = time_ms([&] { hmma_phases<16><<<sms, 32 * warps>>>(out, iters, scalar, 3); }, 5);
  const double flops = 5.0 * sms * warps * double(iters) * 8 * 16 * 16 * 8 * 16 * 2;
  printf("  %2d warps/SM, 128 products then %4d FMAs: %7.1f TFLOP/s\n", warps, scalar, flops / (ms * 1e-3) / 1e12);
}

template <int kChains>
void run(int sms, int warps, float* out) {
  const int iters = 4096;
  hmma_loop<kChains><<<sms, 32 * warps>>>(out, 16, 3);
  if (cudaGetLastError() != cudaSuccess) {  // more registers than an SM holds at this CTA size
    printf("  %2d warps/SM, %2d chains: does not fit\n", warps, kChains);
    return;
  }
  const float ms = time_ms([&] { hmma_loop<kChains><<<sms, 32 * warps>>>(out, iters, 3); }, 5);
  const double flops = 5.0 * sms * warps * double(iters) * kChains * 16 * 8 * 16 * 2;
  printf("  %2d warps/SM (%d per sub-partition), %2d chains: %7.1f TFLOP/s\n", warps, warps / 4, kChains,
         flops / (ms * 1e-3) / 1e12);
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs, mma.sync m16n8k16 bf16 -> fp32\n", prop.name, prop.multiProcessorCount);
  float* out;
  CHECK(cudaMalloc(&out, 4096 * sizeof(float)));
  for (int w : {4, 8, 12, 16, 32}) {
    run<8>(prop.multiProcessorCount, w, out);
    run<16>(prop.multiProcessorCount, w, out);
  }
  for (int w : {4, 8, 12, 16})
    for (int scalar : {0, 256, 512, 1024}) run_phases(prop.multiProcessorCount, w, scalar, out);
  CHECK(cudaFree(out));
  return 0;
}
