// Host-side declaration of the Hopper forward launcher (definition: fwd_sm90.cuh), for the binding.
#pragma once

#include "bsa/params.h"

namespace bsa {

// Launches the sm_90a forward when this process can (sm_90a code loaded for the current device,
// TMA-expressible strides, the driver's tensor-map encoder found) and sets *launched; otherwise
// returns cudaSuccess with *launched == false so that the caller runs the sm80 kernel instead.
template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
cudaError_t run_forward_sm90(const ForwardParams& params, cudaStream_t stream, bool* launched);

}  // namespace bsa
