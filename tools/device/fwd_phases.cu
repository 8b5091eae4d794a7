// Where the Hopper forward's consumer warpgroups spend their cycles, per phase of the steady
// loop (fwd_sm90.cuh, BSA_FWD_PHASE_TIMING), at the W720s shape with random sorted key lists.
// Standalone (no torch): build here, run on the GPU machine.
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -Icsrc/include tools/device/fwd_phases.cu -o fwd_phases && ./fwd_phases
//
// Timing perturbs what it measures a little (clock64 reads and one extra add per phase); build
// with -DBSA_NO_PHASES for the kernel time alone (median of 9 launches), e.g. to compare two
// versions of the header (-I a copy of the old one) on the same card in one call. Adding
// -DBSA_FWD_LOAD_ONLY makes the consumers release every stage unread: the time of the loads
// alone through the same rings (docs/PERF.md, session 11).
#ifndef BSA_NO_PHASES
#define BSA_FWD_PHASE_TIMING
#endif
#include "bsa/fwd_sm90.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_check.h"

namespace {

// bf16 by truncation of a float: enough for timing inputs.
uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

template <int kCapQ, int kCapK, int kD = 128>
void run(const char* name, bsa::Geometry gq, bsa::Geometry gk, int keep) {
  const int H = 32, D = kD, S = gq.T * gq.H * gq.W, nq = gq.num_blocks(), nk = gk.num_blocks();
  const size_t elems = static_cast<size_t>(H) * S * D;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  std::vector<uint16_t> host(elems);
  for (auto& x : host) x = to_bf16(uni(rng));
  void *q, *k, *v, *out;
  float* lse;
  int32_t *indices, *counts;
  CHECK(cudaMalloc(&q, elems * 2));
  CHECK(cudaMalloc(&k, elems * 2));
  CHECK(cudaMalloc(&v, elems * 2));
  CHECK(cudaMalloc(&out, elems * 2));
  CHECK(cudaMalloc(&lse, static_cast<size_t>(H) * S * 4));
  CHECK(cudaMemcpy(q, host.data(), elems * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(k, host.data(), elems * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(v, host.data(), elems * 2, cudaMemcpyHostToDevice));

  // `keep` distinct key blocks per query block, ascending, as selection writes them.
  std::vector<int32_t> idx(static_cast<size_t>(H) * nq * keep), cnt(static_cast<size_t>(H) * nq, keep);
  // BSA_KEY_POOL=n draws every list from the first n key blocks of its head (n >= keep): a
  // working set that stays in L2, to tell L2-miss latency from load-issue limits.
  const char* pool_env = std::getenv("BSA_KEY_POOL");
  const int pool = pool_env ? std::max(keep, std::min(nk, std::atoi(pool_env))) : nk;
  std::vector<int32_t> all(pool);
  for (size_t row = 0; row < cnt.size(); ++row) {
    std::iota(all.begin(), all.end(), 0);
    for (int i = 0; i < keep; ++i) std::swap(all[i], all[i + rng() % (pool - i)]);
    std::sort(all.begin(), all.begin() + keep);
    std::copy(all.begin(), all.begin() + keep, idx.begin() + row * keep);
  }
  // BSA_LISTS=file replaces them (4x4x4 shapes only) by `keep` int32 ids per row, [H][nq][keep],
  // e.g. the selection of the benchmark's video-like inputs: neighbouring rows then share ids.
  const char* lists_env = std::getenv("BSA_LISTS");
  if (lists_env != nullptr && kCapK == 64) {
    FILE* f = std::fopen(lists_env, "rb");
    if (f == nullptr || std::fread(idx.data(), 4, idx.size(), f) != idx.size()) {
      std::fprintf(stderr, "BSA_LISTS: cannot read %zu ids from %s\n", idx.size(), lists_env);
      std::exit(1);
    }
    std::fclose(f);
  }
  CHECK(cudaMalloc(&indices, idx.size() * 4));
  CHECK(cudaMalloc(&counts, cnt.size() * 4));
  CHECK(cudaMemcpy(indices, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(counts, cnt.data(), cnt.size() * 4, cudaMemcpyHostToDevice));

  bsa::ForwardParams p{};
  p.q = q, p.k = k, p.v = v, p.out = out, p.lse = lse, p.indices = indices, p.counts = counts;
  const int64_t hs = static_cast<int64_t>(S) * D;
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.out_batch_stride = H * hs;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.out_head_stride = hs;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.out_row_stride = D;
  p.batch = 1, p.heads = H, p.seq_q = S, p.seq_k = S, p.kmax = keep;
  p.geom_q = gq, p.geom_k = gk;
  p.sm_scale = 1.f / std::sqrt(static_cast<float>(D));
  p.scale_log2 = p.sm_scale * 1.4426950408889634f;

  bool launched = false;
  auto launch = [&] {
    CHECK((bsa::run_forward_sm90<bsa::DType::kBFloat16, kD, kCapQ, kCapK>(p, nullptr, &launched)));
    if (!launched) {
      std::fprintf(stderr, "the sm_90a kernel did not launch on this device\n");
      std::exit(1);
    }
  };
  launch();  // warm-up
  CHECK(cudaDeviceSynchronize());
  const double flops = 4.0 * H * static_cast<double>(S) * keep * gk.capacity() * D;
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  auto timed = [&] {
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    return ms;
  };
#ifdef BSA_NO_PHASES
  std::vector<float> times;
  for (int i = 0; i < 9; ++i) times.push_back(timed());
  std::sort(times.begin(), times.end());
  // A checksum of `out`, so that two builds of the header can be checked for the same result.
  std::vector<uint16_t> res(elems);
  CHECK(cudaMemcpy(res.data(), out, elems * 2, cudaMemcpyDeviceToHost));
  double sum = 0.0;
  for (size_t i = 0; i < elems; ++i) {
    const uint32_t u = static_cast<uint32_t>(res[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    sum += f * static_cast<double>(1 + i % 7);
  }
  std::printf("%s: %.3f ms (%.0f TFLOP/s), median of 9, checksum %.6e\n", name, times[4], flops / times[4] / 1e9,
              sum);
#else
  const unsigned long long zeros[8] = {};
  CHECK(cudaMemcpyToSymbol(bsa::sm90::fwd_phase_cycles, zeros, sizeof(zeros)));
  const float ms = timed();
  unsigned long long c[8];
  CHECK(cudaMemcpyFromSymbol(c, bsa::sm90::fwd_phase_cycles, sizeof(c)));

  const char* names[8] = {"ids + stage waits", "issue (+ turn)", "wait S", "mask + softmax", "wait P V",
                          "rescale + pack", "", "outside the loop"};
  double loop = 0;
  for (int i = 0; i < 6; ++i) loop += static_cast<double>(c[i]);
  std::printf("%s: %.2f ms (%.0f TFLOP/s), %llu loop steps over all consumer warpgroups\n", name, ms,
              flops / ms / 1e9, c[6]);
  for (int i : {0, 1, 2, 3, 4, 5}) {
    std::printf("  %-18s %8.0f cycles/step  %5.1f%%\n", names[i], static_cast<double>(c[i]) / c[6],
                100.0 * c[i] / loop);
  }
  using Tr = bsa::sm90::ForwardTraits<bsa::DType::kBFloat16, kD, kCapQ, kCapK>;
  const double warpgroups = double(Tr::kConsumers) * H * ((nq + Tr::kRings - 1) / Tr::kRings);
  std::printf("  %-18s %8.0f cycles per warpgroup (prologue, first block, last P V, epilogue)\n", names[7],
              static_cast<double>(c[7]) / warpgroups);
#endif
  for (void* ptr : {q, k, v, out}) CHECK(cudaFree(ptr));
  CHECK(cudaFree(lse));
  CHECK(cudaFree(indices));
  CHECK(cudaFree(counts));
}

}  // namespace

int main() {
  // W720s: latent (24, 44, 80); 4x4x4 chunks keep 82 of 1320 key blocks; 4x4x8 chunks 82 of 660.
  run<64, 64>("W720s (4x4x4, 82 of 1320)", {24, 44, 80, 4, 4, 4, 6, 11, 20}, {24, 44, 80, 4, 4, 4, 6, 11, 20}, 82);
  if (std::getenv("BSA_HDIM64"))  // the same lists at head dim 64
    run<64, 64, 64>("W720s, head dim 64", {24, 44, 80, 4, 4, 4, 6, 11, 20}, {24, 44, 80, 4, 4, 4, 6, 11, 20}, 82);
  run<128, 128>("W720s-c128 (4x4x8, 82 of 660)", {24, 44, 80, 4, 4, 8, 6, 11, 10}, {24, 44, 80, 4, 4, 8, 6, 11, 10},
                82);
  return 0;
}
