// The "cuda" backend's kernels for the ops declared in csrc/fastattn.cpp, registered with
// TORCH_LIBRARY_IMPL(fastattn, CUDA, m). This file is the only one here that includes torch: it
// checks arguments (csrc/checks.h, shared with the CPU kernels), allocates outputs, and calls the plain-pointer launchers of attn_*.cu / ffn_kernels.cu on the current stream.
// The feed-forward GEMMs are cuBLASLt with fused epilogues.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cublasLt.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "../checks.h"
#include "attn_params.h"

namespace fastattn {
namespace cuda {
namespace {

using at::Tensor;

#define FA_CHECK_CUDA(err, what) \
  TORCH_CHECK((err) == cudaSuccess, "fastattn cuda: ", what, " failed: ", cudaGetErrorString(err))

// What these kernels serve (tensor-core buckets up to head dim 256); the checks are csrc/checks.h's.
const Serves& cuda_attention_serves() {
  static const Serves s{c10::DeviceType::CUDA, {at::kFloat, at::kHalf, at::kBFloat16}, 256};
  return s;
}
const Serves& cuda_ffn_serves() {
  static const Serves s{c10::DeviceType::CUDA, {at::kFloat, at::kHalf, at::kBFloat16}};
  return s;
}

// The kernels' element type of a checked dtype.
DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat, "fastattn cuda: unchecked dtype ", t.scalar_type());
      return DType::kFloat32;
  }
}

// Runs the launcher of one attention kernel family (fp32, fp16, bf16) for dtype on the current stream.
using AttnLauncher = cudaError_t (*)(const AttnParams&, cudaStream_t);
struct AttnLaunchers {
  AttnLauncher fp32, fp16, bf16;
};
void launch(DType dtype, const AttnLaunchers& l, const AttnParams& p, const char* what) {
  const AttnLauncher fn = dtype == DType::kFloat16 ? l.fp16 : dtype == DType::kBFloat16 ? l.bf16 : l.fp32;
  FA_CHECK_CUDA(fn(p, at::cuda::getCurrentCUDAStream()), what);
}

// The dropout key: an int64 tensor (2,) (seed, counter offset) on `like`'s device is read by the kernels
// on the device (torch.ops.fastattn.cuda_philox_seed writes it, graph-safe); a CPU tensor, (1,) seed
// with offset 0 or (2,) (seed, offset), is read here.
DropoutKey dropout_key(double dropout_p, const std::optional<Tensor>& seed, const Tensor& like) {
  DropoutKey key;
  if (dropout_p <= 0.0) return key;  // seed checked by checks.h's check_dropout
  const Tensor& t = *seed;
  if (t.is_cuda()) {
    key.device = t.data_ptr<int64_t>();
    return key;
  }
  const Tensor c = t.reshape({-1});
  key.seed = static_cast<uint64_t>(c[0].item<int64_t>());
  key.offset = t.numel() == 2 ? static_cast<uint64_t>(c[1].item<int64_t>()) : 0;
  return key;
}

// torch.ops.fastattn.cuda_philox_seed(like, increment): (seed, offset) of the default CUDA generator of
// like's device as an int64 (2,) tensor there, the generator's offset advanced by `increment`.
// Written on the device by one thread from philox_cuda_state, so under CUDA-graph capture each replay
// writes that replay's state (see philox_seed.cu).
Tensor cuda_philox_seed_cuda(const Tensor& like, int64_t increment) {
  TORCH_CHECK(like.is_cuda(), "fastattn cuda: cuda_philox_seed: argument 'like' is on ", like.device(),
              "; expected a CUDA tensor");
  TORCH_CHECK(increment > 0 && increment % 4 == 0, "fastattn cuda: cuda_philox_seed: argument 'increment' got ",
              increment, "; expected a positive multiple of 4");
  const c10::cuda::CUDAGuard guard(like.device());
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(like.device().index()));
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state(static_cast<uint64_t>(increment));
  }
  Tensor out = at::empty({2}, like.options().dtype(at::kLong));
  FA_CHECK_CUDA(write_philox_seed(&state, out.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()),
                "cuda_philox_seed kernel launch");
  return out;
}

// Checks the arguments (checks.h) and fills everything but the backward tensors.
AttnParams attention_params(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& attn_mask,
                            const std::optional<Tensor>& key_padding_mask, double dropout_p, bool is_causal,
                            double scale, const std::optional<Tensor>& seed) {
  const AttnShape s =
      check_attention_args(q, k, v, attn_mask, key_padding_mask, dropout_p, seed, cuda_attention_serves());
  AttnParams p;
  p.N = static_cast<int>(s.N);
  p.Hq = static_cast<int>(s.Hq);
  p.L = static_cast<int>(s.L);
  p.E = static_cast<int>(s.E);
  p.Hkv = static_cast<int>(s.Hkv);
  p.S = static_cast<int>(s.S);
  p.Ev = static_cast<int>(s.Ev);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  if (attn_mask.has_value() && attn_mask->defined()) {
    const Tensor& m = *attn_mask;
    p.mask = static_cast<const float*>(m.data_ptr());  // float32: checks.h's expected_mask_dtype
    p.mask_sb = m.stride(0);
    p.mask_sh = m.stride(1);
    p.mask_sl = m.stride(2);
    p.mask_ss = m.stride(3);
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const Tensor& kp = *key_padding_mask;
    p.kpm = reinterpret_cast<const uint8_t*>(kp.data_ptr<bool>());
  }
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = dropout_key(dropout_p, seed, q);
  return p;
}

std::tuple<Tensor, Tensor> attention_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const std::optional<Tensor>& attn_mask,
                                              const std::optional<Tensor>& key_padding_mask, double dropout_p,
                                              bool is_causal, double scale, const std::optional<Tensor>& seed) {
  AttnParams p = attention_params(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty({p.N, p.Hq, p.L, p.Ev}, q.options());
  Tensor lse = at::empty({p.N, p.Hq, p.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  launch(dtype_of(q), {&attention_forward_fp32, &attention_forward_tc<__half>, &attention_forward_tc<__nv_bfloat16>},
         p, "attention_fwd kernel launch");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cuda(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& out, const Tensor& lse,
                                                      const std::optional<Tensor>& attn_mask,
                                                      const std::optional<Tensor>& key_padding_mask,
                                                      double dropout_p, bool is_causal, double scale,
                                                      const std::optional<Tensor>& seed) {
  AttnParams p = attention_params(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed);
  const c10::cuda::CUDAGuard guard(q.device());
  check_attention_bwd_args(grad_out, out, lse, q, AttnShape{p.N, p.Hq, p.Hkv, p.L, p.S, p.E, p.Ev});
  const Tensor dout_c = grad_out.contiguous();
  const Tensor out_c = out.contiguous();
  const Tensor lse_c = lse.contiguous();
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty_like(k);
  Tensor dv = at::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  Tensor delta = at::empty({p.N, p.Hq, p.L}, q.options().dtype(at::kFloat));
  p.out = const_cast<void*>(out_c.data_ptr());
  p.lse = const_cast<float*>(lse_c.data_ptr<float>());
  p.dout = dout_c.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = delta.data_ptr<float>();
  Tensor lse_split = at::empty({2, p.N, p.Hq, p.L}, q.options().dtype(at::kFloat));  // see attn_params.h
  p.lse_base = lse_split.data_ptr<float>();
  p.lse_rest = p.lse_base + static_cast<int64_t>(p.N) * p.Hq * p.L;
  launch(dtype_of(q),
         {&attention_backward_fp32, &attention_backward_tc<__half>, &attention_backward_tc<__nv_bfloat16>}, p,
         "attention_bwd kernel launch");
  return {dq, dk, dv};
}

// ---- feed-forward: cuBLASLt -------------------------------------------------------------------------
//
// Row-major (torch) matrices are column-major transposes, so every GEMM below is written as the
// column-major product D (m x n, ld ldd) = op(A) op(B) cuBLASLt sees. Epilogues used:
//   forward  GEMM1: RELU_BIAS / GELU_BIAS (no dropout, nothing saved), GELU_AUX_BIAS (gelu_tanh, no
//                   dropout, saved = the aux output = pre-activation), else BIAS + elementwise kernel.
//   backward GEMM dH: DGELU_BGRAD (gelu_tanh, no dropout: dPre and db1 in one pass), else plain +
//                   elementwise kernel; weight GEMMs use BGRADB for db1 / db2.
// cuBLASLt's GELU / DGELU epilogues are the tanh approximation (the form torch uses them for in
// at::_addmm_activation(use_gelu=True)), so the exact erf "gelu" always takes the BIAS epilogue +
// elementwise-kernel path; ReLU's AUX epilogue stores a bit mask, not the pre-activation the
// contract saves, so a saving ReLU forward takes that path as well.

struct LtResources {
  cublasLtHandle_t handle;
  cudaStream_t stream;
  void* workspace;
  size_t workspace_size;
};

cudaDataType_t cuda_dtype(DType d) {
  switch (d) {
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

struct LtGemm {
  cublasOperation_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
  int64_t m = 0, n = 0, k = 0;
  const void* A = nullptr;
  int64_t lda = 0;
  const void* B = nullptr;
  int64_t ldb = 0;
  void* D = nullptr;
  int64_t ldd = 0;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // bias (BIAS epilogues) or bias-gradient output (BGRAD epilogues)
  void* aux = nullptr;         // GELU input: written by GELU_AUX*, read by DGELU*
  int64_t ld_aux = 0;
};

// The column-major product D (m x n, ld ldd) = op(A) (ld lda) op(B) (ld ldb) over the inner dimension k,
// no epilogue yet.
LtGemm lt_gemm(int64_t m, int64_t n, int64_t k, const void* A, int64_t lda, const void* B, int64_t ldb, void* D,
               int64_t ldd, cublasOperation_t transa = CUBLAS_OP_N, cublasOperation_t transb = CUBLAS_OP_N) {
  return LtGemm{transa, transb, m, n, k, A, lda, B, ldb, D, ldd};
}

// Runs the GEMM; false (nothing launched) when cuBLASLt has no algorithm for it, so the caller can
// take a plainer path.
bool lt_matmul(const LtResources& r, DType dtype, const LtGemm& g) {
  const cudaDataType_t dt = cuda_dtype(dtype);
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  bool ok = false;
  do {
    if (cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS) break;
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &g.transa, sizeof(g.transa));
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &g.transb, sizeof(g.transb));
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue, sizeof(g.epilogue));
    if (g.bias) {
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias));
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt, sizeof(dt));
    }
    if (g.aux) {
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux));
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &g.ld_aux, sizeof(g.ld_aux));
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &dt, sizeof(dt));
    }
    const bool ta = g.transa != CUBLAS_OP_N, tb = g.transb != CUBLAS_OP_N;
    if (cublasLtMatrixLayoutCreate(&la, dt, ta ? g.k : g.m, ta ? g.m : g.k, g.lda) != CUBLAS_STATUS_SUCCESS) break;
    if (cublasLtMatrixLayoutCreate(&lb, dt, tb ? g.n : g.k, tb ? g.k : g.n, g.ldb) != CUBLAS_STATUS_SUCCESS) break;
    if (cublasLtMatrixLayoutCreate(&ld, dt, g.m, g.n, g.ldd) != CUBLAS_STATUS_SUCCESS) break;
    if (cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS) break;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &r.workspace_size,
                                         sizeof(r.workspace_size));
    cublasLtMatmulHeuristicResult_t heur{};
    int found = 0;
    if (cublasLtMatmulAlgoGetHeuristic(r.handle, op, la, lb, ld, ld, pref, 1, &heur, &found) !=
            CUBLAS_STATUS_SUCCESS ||
        found == 0)
      break;
    const float alpha = 1.f, beta = 0.f;
    ok = cublasLtMatmul(r.handle, op, &alpha, g.A, la, g.B, lb, &beta, g.D, ld, g.D, ld, &heur.algo, r.workspace,
                        r.workspace_size, r.stream) == CUBLAS_STATUS_SUCCESS;
  } while (false);
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  if (ld) cublasLtMatrixLayoutDestroy(ld);
  if (lb) cublasLtMatrixLayoutDestroy(lb);
  if (la) cublasLtMatrixLayoutDestroy(la);
  if (op) cublasLtMatmulDescDestroy(op);
  return ok;
}

// row-major out (M, N) = a (M, K) @ b^T where b is (N, K), plus bias (N,) when given; into `out`.
// cuBLASLt first (epilogue BIAS or DEFAULT), torch's matmul when cuBLASLt declines.
void linear_into(const LtResources& r, DType dtype, const Tensor& a, const Tensor& b, const std::optional<Tensor>& bias,
                 Tensor& out) {
  LtGemm g = lt_gemm(b.size(0), a.size(0), a.size(1), b.data_ptr(), b.size(1), a.data_ptr(), a.size(1), out.data_ptr(),
                     out.size(1), CUBLAS_OP_T);
  const bool has_bias = bias.has_value() && bias->defined();
  g.epilogue = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  g.bias = has_bias ? bias->data_ptr() : nullptr;
  if (lt_matmul(r, dtype, g)) return;
  if (has_bias) {
    at::addmm_out(out, *bias, a, b.t());
  } else {
    at::mm_out(out, a, b.t());
  }
}

LtResources lt_resources(const Tensor& like, Tensor& workspace_holder) {
  constexpr size_t kWorkspace = 32u << 20;
  workspace_holder = at::empty({static_cast<int64_t>(kWorkspace)}, like.options().dtype(at::kByte));
  return LtResources{at::cuda::getCurrentCUDABlasLtHandle(), at::cuda::getCurrentCUDAStream(),
                     workspace_holder.data_ptr(), kWorkspace};
}

std::optional<Tensor> contig(const std::optional<Tensor>& t) {
  if (t.has_value() && t->defined()) return t->contiguous();
  return std::nullopt;
}

std::tuple<Tensor, Tensor> ffn_fwd_cuda(const Tensor& x_in, const Tensor& w1_in, const std::optional<Tensor>& b1_in,
                                        const Tensor& w2_in, const std::optional<Tensor>& b2_in,
                                        c10::string_view activation, double dropout_p, const std::optional<Tensor>& seed,
                                        bool save_for_backward) {
  const FfnShape s = check_ffn_args(x_in, w1_in, b1_in, w2_in, b2_in, activation, dropout_p, seed, cuda_ffn_serves());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor& x = x_in;  // checked contiguous
  const Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const std::optional<Tensor> b1 = contig(b1_in), b2 = contig(b2_in);
  const Activation act = s.act;
  const DropoutKey seed_v = dropout_key(dropout_p, seed, x);
  const DType dtype = dtype_of(x);
  const float p = static_cast<float>(dropout_p);
  Tensor out = at::empty({s.T, s.D2}, x.options());
  Tensor saved = save_for_backward ? at::empty({s.T, s.F}, x.options()) : at::empty({0}, x.options());
  if (s.T == 0) return {out, saved};
  Tensor ws;
  const LtResources r = lt_resources(x, ws);
  const cudaStream_t stream = r.stream;
  Tensor hidden = at::empty({s.T, s.F}, x.options());
  const bool has_b1 = b1.has_value();

  // GEMM 1 with the activation in the epilogue where cuBLASLt offers it (see the comment above).
  bool fused = false;
  if (p == 0.f && act != Activation::kGelu && s.D > 0) {
    LtGemm g = lt_gemm(s.F, s.T, s.D, w1.data_ptr(), s.D, x.data_ptr(), s.D, hidden.data_ptr(), s.F, CUBLAS_OP_T);
    g.bias = has_b1 ? b1->data_ptr() : nullptr;
    if (act == Activation::kRelu && !save_for_backward) {
      g.epilogue = has_b1 ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
      fused = lt_matmul(r, dtype, g);
    } else if (act == Activation::kGeluTanh) {
      if (save_for_backward) {
        if (s.F % 8 == 0) {  // aux leading dimension must be a multiple of 8
          g.epilogue = has_b1 ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
          g.aux = saved.data_ptr();
          g.ld_aux = s.F;
          fused = lt_matmul(r, dtype, g);
        }
      } else {
        g.epilogue = has_b1 ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
        fused = lt_matmul(r, dtype, g);
      }
    }
  }
  if (!fused) {
    // pre-activation (biased) into saved, or into hidden itself when nothing is saved
    Tensor pre = save_for_backward ? saved : hidden;
    if (s.D > 0) {
      linear_into(r, dtype, x, w1, b1, pre);
    } else if (has_b1) {
      pre.copy_(b1->unsqueeze(0).expand({s.T, s.F}));
    } else {
      pre.zero_();
    }
    FA_CHECK_CUDA(ffn_activation_forward(dtype, act, pre.data_ptr(), nullptr, nullptr, hidden.data_ptr(), s.T, s.F,
                                         p, seed_v, stream),
                  "ffn_fwd activation kernel");
  }
  // GEMM 2: out = hidden @ w2^T + b2
  linear_into(r, dtype, hidden, w2, b2, out);
  return {out, saved};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ffn_bwd_cuda(
    const Tensor& grad_out_in, const Tensor& x_in, const Tensor& w1_in, const std::optional<Tensor>& b1_in,
    const Tensor& w2_in, const std::optional<Tensor>& b2_in, const Tensor& saved_in, c10::string_view activation,
    double dropout_p, const std::optional<Tensor>& seed) {
  const FfnShape s = check_ffn_args(x_in, w1_in, b1_in, w2_in, b2_in, activation, dropout_p, seed, cuda_ffn_serves());
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_ffn_bwd_args(grad_out_in, saved_in, x_in, s);
  const Tensor& x = x_in;  // checked contiguous
  const Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const Tensor dout = grad_out_in.contiguous(), pre = saved_in.contiguous();
  const std::optional<Tensor> b1 = contig(b1_in), b2 = contig(b2_in);
  const Activation act = s.act;
  const DropoutKey seed_v = dropout_key(dropout_p, seed, x);
  const DType dtype = dtype_of(x);
  const float p = static_cast<float>(dropout_p);

  Tensor dx = at::empty_like(x), dw1 = at::empty_like(w1), dw2 = at::empty_like(w2);
  Tensor db1 = at::empty({s.F}, x.options()), db2 = at::empty({s.D2}, x.options());
  if (s.T == 0) {
    dx.zero_();
    dw1.zero_();
    dw2.zero_();
    db1.zero_();
    db2.zero_();
    return {dx, dw1, db1, dw2, db2};
  }
  Tensor ws;
  const LtResources r = lt_resources(x, ws);
  const cudaStream_t stream = r.stream;
  Tensor hidden = at::empty({s.T, s.F}, x.options());  // dropout(act(pre)): what GEMM 2 saw
  Tensor dpre = at::empty({s.T, s.F}, x.options());

  // dH = grad_out @ w2 (T, F); then dPre = dH * keep/(1-p) * act'(pre).
  // col-major dPre^T (F x T) = w2^T (F x D2) * grad_out^T (D2 x T)
  const LtGemm dh = lt_gemm(s.F, s.T, s.D2, w2.data_ptr(), s.F, dout.data_ptr(), s.D2, dpre.data_ptr(), s.F);
  bool db1_done = false;
  bool fused = false;
  if (p == 0.f && act == Activation::kGeluTanh && s.F % 8 == 0 && s.D2 > 0) {
    LtGemm g = dh;  // DGELU + bias grad in the epilogue
    g.epilogue = CUBLASLT_EPILOGUE_DGELU_BGRAD;
    g.bias = db1.data_ptr();
    g.aux = const_cast<void*>(pre.data_ptr());
    g.ld_aux = s.F;
    fused = lt_matmul(r, dtype, g);
    db1_done = fused;
    if (fused) {
      FA_CHECK_CUDA(ffn_activation_forward(dtype, act, pre.data_ptr(), nullptr, nullptr, hidden.data_ptr(), s.T,
                                           s.F, 0.f, DropoutKey{}, stream),
                    "ffn_bwd activation kernel");
    }
  }
  if (!fused) {
    if (s.D2 == 0) {
      dpre.zero_();
    } else if (!lt_matmul(r, dtype, dh)) {
      at::mm_out(dpre, dout, w2);
    }
    FA_CHECK_CUDA(ffn_activation_backward(dtype, act, pre.data_ptr(), dpre.data_ptr(), hidden.data_ptr(),
                                          dpre.data_ptr(), s.T, s.F, p, seed_v, stream),
                  "ffn_bwd activation kernel");
  }

  // weight gradients: dW (rows x cols) = g^T (rows x T) @ a (T x cols), bias grad = column sums of g
  auto weight_grad = [&](const Tensor& gmat, const Tensor& amat, Tensor& dw, Tensor* db) {
    // col-major dW^T (cols x rows) = a^T (cols x T) * g (T x rows); BGRADB sums g over T
    LtGemm g = lt_gemm(amat.size(1), gmat.size(1), s.T, amat.data_ptr(), amat.size(1), gmat.data_ptr(), gmat.size(1),
                       dw.data_ptr(), amat.size(1), CUBLAS_OP_N, CUBLAS_OP_T);
    if (g.m == 0 || g.n == 0) {
      if (db) at::sum_out(*db, gmat, {0});
      return;
    }
    if (db) {
      g.epilogue = CUBLASLT_EPILOGUE_BGRADB;
      g.bias = db->data_ptr();
      if (lt_matmul(r, dtype, g)) return;
      g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
      g.bias = nullptr;
    }
    if (!lt_matmul(r, dtype, g)) at::mm_out(dw, gmat.t(), amat);
    if (db) at::sum_out(*db, gmat, {0});
  };
  weight_grad(dout, hidden, dw2, &db2);
  weight_grad(dpre, x, dw1, db1_done ? nullptr : &db1);

  // dx (T, D) = dPre (T, F) @ w1 (F, D): col-major dx^T (D x T) = w1^T (D x F) * dPre^T (F x T)
  const LtGemm gx = lt_gemm(s.D, s.T, s.F, w1.data_ptr(), s.D, dpre.data_ptr(), s.F, dx.data_ptr(), s.D);
  if (s.D > 0 && (s.F == 0 || !lt_matmul(r, dtype, gx))) {
    if (s.F == 0) {
      dx.zero_();
    } else {
      at::mm_out(dx, dpre, w1);
    }
  }
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace
}  // namespace cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_fwd", &fastattn::cuda::attention_fwd_cuda);
  m.impl("attention_bwd", &fastattn::cuda::attention_bwd_cuda);
  m.impl("ffn_fwd", &fastattn::cuda::ffn_fwd_cuda);
  m.impl("ffn_bwd", &fastattn::cuda::ffn_bwd_cuda);
  m.impl("cuda_philox_seed", &fastattn::cuda::cuda_philox_seed_cuda);
}
