// Tensor-core attention backward, bf16: attention_backward_tc (attn_tc_bwd.cuh) for this dtype (see attn_params.h).
#include "attn_tc_bwd.cuh"

namespace fastattn {
namespace cuda {
template cudaError_t attention_backward_tc<__nv_bfloat16>(const AttnParams& p, cudaStream_t stream);
}  // namespace cuda
}  // namespace fastattn
