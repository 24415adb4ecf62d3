// Tensor-core attention backward, fp16: the head-dim buckets of attn_tc_bwd.cuh for one dtype.
// Template arguments: <dtype, head-dim bucket, keys per dQ tile, queries per dK/dV tile, split dK/dV>.
#include "attn_tc_bwd.cuh"

namespace fastattn {
namespace cuda {

cudaError_t attention_backward_fp16(const AttnParams& p, cudaStream_t stream) {
  switch (attention_head_bucket(p.E, p.Ev)) {
    case 32: return launch_attn_bwd_tc<__half, 32, 64, 64, false>(p, stream);
    case 64: return launch_attn_bwd_tc<__half, 64, 64, 64, false>(p, stream);
    case 96: return launch_attn_bwd_tc<__half, 96, 64, 32, false>(p, stream);
    case 128: return launch_attn_bwd_tc<__half, 128, 64, 32, false>(p, stream);
    default: return launch_attn_bwd_tc<__half, 256, 32, 32, true>(p, stream);
  }
}

}  // namespace cuda
}  // namespace fastattn
