// torch.ops.fastattn.cuda_philox_seed's kernel: one thread writes the CUDA generator's Philox state
// as int64 (seed, offset) into device memory, where fastattn's dropout kernels read it.
//
// The state comes from CUDAGeneratorImpl::philox_cuda_state(increment) (cuda_ops.cpp). Outside graph
// capture it holds the values; during capture it holds pointers to the generator's seed and offset
// tensors that torch rewrites before every replay, so at::cuda::philox::unpack reads the replay's
// values here, on the device: each replay gets a fresh (seed, offset), as torch's own fused dropout
// kernels do. Includes only torch's two plain headers for the state (no c10/CUDA build macros), so it
// compiles with nvcc and the torch include folder alone (tests/test_cuda_philox_seed.py).
#include <cstdint>
#include <tuple>

#include <cuda_runtime_api.h>

#include <ATen/cuda/PhiloxCudaState.h>
#include <ATen/cuda/detail/UnpackRaw.cuh>

#include "attn_params.h"

namespace fastattn {
namespace cuda {
namespace {

__global__ void __launch_bounds__(1) philox_seed_kernel(at::PhiloxCudaState state, int64_t* out) {
  const auto key = at::cuda::philox::unpack(state);
  out[0] = static_cast<int64_t>(std::get<0>(key));
  out[1] = static_cast<int64_t>(std::get<1>(key));
}

}  // namespace

cudaError_t write_philox_seed(const void* state, int64_t* out, cudaStream_t stream) {
  philox_seed_kernel<<<1, 1, 0, stream>>>(*static_cast<const at::PhiloxCudaState*>(state), out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastattn
