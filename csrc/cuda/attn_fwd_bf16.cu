// Tensor-core attention forward, bf16: attention_forward_tc (attn_tc_fwd.cuh) for this dtype (see attn_params.h).
#include "attn_tc_fwd.cuh"

namespace fastattn {
namespace cuda {
template cudaError_t attention_forward_tc<__nv_bfloat16>(const AttnParams& p, cudaStream_t stream);
}  // namespace cuda
}  // namespace fastattn
