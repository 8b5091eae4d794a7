// Host-side declarations of the Hopper launchers (definitions: fwd_sm90.cuh, bwd_sm90.cuh), for the binding.
#pragma once

#include "bsa/params.h"

namespace bsa {

// Launches the sm_90a forward when this process can (sm_90a code loaded for the current device,
// TMA-expressible strides, the driver's tensor-map encoder found) and sets *launched; otherwise
// returns cudaSuccess with *launched == false so that the caller runs the sm80 kernel instead.
template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
cudaError_t run_forward_sm90(const ForwardParams& params, cudaStream_t stream, bool* launched);

// The Hopper backward (bwd_sm90.cuh), same contract: *launched == false means run the sm80 one.
template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
cudaError_t run_backward_sm90(const BackwardParams& params, cudaStream_t stream, bool* launched);

}  // namespace bsa
