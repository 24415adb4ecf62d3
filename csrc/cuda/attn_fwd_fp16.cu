// Tensor-core attention forward, fp16: the head-dim buckets of attn_tc_fwd.cuh for one dtype
// (one file per dtype so ninja compiles them in parallel).
#include "attn_tc_fwd.cuh"

namespace fastattn {
namespace cuda {

cudaError_t attention_forward_fp16(const AttnParams& p, cudaStream_t stream) {
  switch (attention_head_bucket(p.E, p.Ev)) {
    case 32: return launch_attn_fwd_tc<__half, 32, 64>(p, stream);
    case 64: return launch_attn_fwd_tc<__half, 64, 64>(p, stream);
    case 96: return launch_attn_fwd_tc<__half, 96, 64>(p, stream);
    case 128: return launch_attn_fwd_tc<__half, 128, 64>(p, stream);
    default: return launch_attn_fwd_tc<__half, 256, 32>(p, stream);
  }
}

}  // namespace cuda
}  // namespace fastattn
