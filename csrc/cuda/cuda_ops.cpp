// The "cuda" backend's kernels for the ops declared in csrc/fastattn.cpp, registered with
// TORCH_LIBRARY_IMPL(fastattn, CUDA, m). This file is the only one here that includes torch: it
// checks arguments (against fastattn/backends/README.md, the contract), allocates outputs, and
// calls the plain-pointer launchers of attn_*.cu / ffn_kernels.cu on the current stream.
// The feed-forward GEMMs are cuBLASLt with fused epilogues.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cublasLt.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "attn_params.h"

namespace fastattn {
namespace cuda {
namespace {

using at::Tensor;

#define FA_CHECK_CUDA(err, what) \
  TORCH_CHECK((err) == cudaSuccess, "fastattn cuda: ", what, " failed: ", cudaGetErrorString(err))

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastattn cuda: ", name, " has dtype ", t.scalar_type(),
                  "; expected float32, float16 or bfloat16");
  }
  return DType::kFloat32;
}

void check_cuda_tensor(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "fastattn cuda: ", name, " is on ", t.device(), "; expected a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "fastattn cuda: ", name, " is on ", t.device(), "; expected ",
              like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastattn cuda: ", name, " has dtype ", t.scalar_type(),
              "; expected ", like.scalar_type());
}

uint64_t seed_value(double dropout_p, const std::optional<Tensor>& seed) {
  if (dropout_p <= 0.0) return 0;
  TORCH_CHECK(dropout_p < 1.0, "fastattn cuda: dropout_p = ", dropout_p, "; expected a value in [0, 1)");
  TORCH_CHECK(seed.has_value() && seed->defined(), "fastattn cuda: dropout_p = ", dropout_p,
              " > 0 needs seed, an int64 CPU tensor of shape (1,); got None");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, "fastattn cuda: seed has dtype ",
              seed->scalar_type(), " and ", seed->numel(), " elements; expected int64 of shape (1,)");
  return static_cast<uint64_t>(seed->item<int64_t>());
}

// The additive mask as the kernels read it: float32 (a mask in q's 16-bit dtype is widened).
std::optional<Tensor> float_mask(const std::optional<Tensor>& attn_mask) {
  if (!attn_mask.has_value() || !attn_mask->defined() || attn_mask->scalar_type() == at::kFloat) return attn_mask;
  TORCH_CHECK(attn_mask->is_floating_point(), "fastattn cuda: attn_mask has dtype ", attn_mask->scalar_type(),
              "; expected an additive float32 mask");
  return attn_mask->to(at::kFloat);
}

// Fills everything but the backward tensors; checks shapes against the contract.
AttnParams attention_params(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& attn_mask,
                            const std::optional<Tensor>& key_padding_mask, double dropout_p, bool is_causal,
                            double scale, const std::optional<Tensor>& seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fastattn cuda: q, k, v must be 4-D (N, H, L, E); got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  check_cuda_tensor(q, "q", q);
  check_cuda_tensor(k, "k", q);
  check_cuda_tensor(v, "v", q);
  dtype_of(q, "q");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "fastattn cuda: q, k, v must be contiguous");
  AttnParams p;
  p.N = static_cast<int>(q.size(0));
  p.Hq = static_cast<int>(q.size(1));
  p.L = static_cast<int>(q.size(2));
  p.E = static_cast<int>(q.size(3));
  p.Hkv = static_cast<int>(k.size(1));
  p.S = static_cast<int>(k.size(2));
  p.Ev = static_cast<int>(v.size(3));
  TORCH_CHECK(k.size(0) == p.N && v.size(0) == p.N && v.size(1) == p.Hkv && v.size(2) == p.S && k.size(3) == p.E,
              "fastattn cuda: k ", k.sizes(), " and v ", v.sizes(), " do not match q ", q.sizes(),
              "; expected k (N, Hkv, S, E), v (N, Hkv, S, Ev)");
  TORCH_CHECK((p.Hkv > 0 && p.Hq % p.Hkv == 0) || (p.Hq == 0 && p.Hkv == 0), "fastattn cuda: query heads ", p.Hq,
              " must be a multiple of key/value heads ", p.Hkv);
  TORCH_CHECK(p.E >= 1 && p.E <= 256 && p.Ev >= 1 && p.Ev <= 256, "fastattn cuda: head dims E = ", p.E,
              ", Ev = ", p.Ev, "; expected 1..256");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  if (attn_mask.has_value() && attn_mask->defined()) {
    const Tensor& m = *attn_mask;
    TORCH_CHECK(m.is_cuda() && m.device() == q.device(), "fastattn cuda: attn_mask is on ", m.device(),
                "; expected ", q.device());
    TORCH_CHECK(m.scalar_type() == at::kFloat, "fastattn cuda: attn_mask has dtype ", m.scalar_type(),
                "; expected float32 (added at fp32 accumulation precision)");
    TORCH_CHECK(m.dim() == 4 && m.size(0) == p.N && m.size(1) == p.Hq && m.size(2) == p.L && m.size(3) == p.S,
                "fastattn cuda: attn_mask has shape ", m.sizes(), "; expected the expanded view (N, Hq, L, S) = (",
                p.N, ", ", p.Hq, ", ", p.L, ", ", p.S, ")");
    p.mask = m.data_ptr<float>();
    p.mask_sb = m.stride(0);
    p.mask_sh = m.stride(1);
    p.mask_sl = m.stride(2);
    p.mask_ss = m.stride(3);
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const Tensor& kp = *key_padding_mask;
    TORCH_CHECK(kp.is_cuda() && kp.device() == q.device(), "fastattn cuda: key_padding_mask is on ", kp.device(),
                "; expected ", q.device());
    TORCH_CHECK(kp.scalar_type() == at::kBool && kp.dim() == 2 && kp.size(0) == p.N && kp.size(1) == p.S &&
                    kp.is_contiguous(),
                "fastattn cuda: key_padding_mask is ", kp.scalar_type(), " ", kp.sizes(),
                "; expected contiguous bool (N, S) = (", p.N, ", ", p.S, ")");
    p.kpm = reinterpret_cast<const uint8_t*>(kp.data_ptr<bool>());
  }
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = seed_value(dropout_p, seed);
  return p;
}

std::tuple<Tensor, Tensor> attention_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const std::optional<Tensor>& attn_mask,
                                              const std::optional<Tensor>& key_padding_mask, double dropout_p,
                                              bool is_causal, double scale, const std::optional<Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(q.device());
  const std::optional<Tensor> mask32 = float_mask(attn_mask);
  AttnParams p = attention_params(q, k, v, mask32, key_padding_mask, dropout_p, is_causal, scale, seed);
  Tensor out = at::empty({p.N, p.Hq, p.L, p.Ev}, q.options());
  Tensor lse = at::empty({p.N, p.Hq, p.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (dtype_of(q, "q")) {
    case DType::kFloat16: err = attention_forward_fp16(p, stream); break;
    case DType::kBFloat16: err = attention_forward_bf16(p, stream); break;
    default: err = attention_forward_fp32(p, stream); break;
  }
  FA_CHECK_CUDA(err, "attention_fwd kernel launch");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cuda(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& out, const Tensor& lse,
                                                      const std::optional<Tensor>& attn_mask,
                                                      const std::optional<Tensor>& key_padding_mask,
                                                      double dropout_p, bool is_causal, double scale,
                                                      const std::optional<Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(q.device());
  const std::optional<Tensor> mask32 = float_mask(attn_mask);
  AttnParams p = attention_params(q, k, v, mask32, key_padding_mask, dropout_p, is_causal, scale, seed);
  const Tensor dout_c = grad_out.contiguous();
  const Tensor out_c = out.contiguous();
  const Tensor lse_c = lse.contiguous();
  check_cuda_tensor(dout_c, "grad_out", q);
  check_cuda_tensor(out_c, "out", q);
  TORCH_CHECK(dout_c.sizes() == out_c.sizes() && out_c.dim() == 4 && out_c.size(0) == p.N &&
                  out_c.size(1) == p.Hq && out_c.size(2) == p.L && out_c.size(3) == p.Ev,
              "fastattn cuda: grad_out ", dout_c.sizes(), " and out ", out_c.sizes(), "; expected (N, Hq, L, Ev) = (",
              p.N, ", ", p.Hq, ", ", p.L, ", ", p.Ev, ")");
  TORCH_CHECK(lse_c.is_cuda() && lse_c.scalar_type() == at::kFloat && lse_c.dim() == 3 && lse_c.size(0) == p.N &&
                  lse_c.size(1) == p.Hq && lse_c.size(2) == p.L,
              "fastattn cuda: lse is ", lse_c.scalar_type(), " ", lse_c.sizes(), "; expected float32 (N, Hq, L)");
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
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (dtype_of(q, "q")) {
    case DType::kFloat16: err = attention_backward_fp16(p, stream); break;
    case DType::kBFloat16: err = attention_backward_bf16(p, stream); break;
    default: err = attention_backward_fp32(p, stream); break;
  }
  FA_CHECK_CUDA(err, "attention_bwd kernel launch");
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
  LtGemm g;
  g.transa = CUBLAS_OP_T;
  g.transb = CUBLAS_OP_N;
  g.m = b.size(0);
  g.n = a.size(0);
  g.k = a.size(1);
  g.A = b.data_ptr();
  g.lda = b.size(1);
  g.B = a.data_ptr();
  g.ldb = a.size(1);
  g.D = out.data_ptr();
  g.ldd = out.size(1);
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

Activation activation_of(c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(false, "fastattn cuda: activation = '", std::string(name), "'; expected 'relu', 'gelu' or 'gelu_tanh'");
  return Activation::kRelu;
}

struct FfnShapes {
  int64_t T, D, F, D2;
};

FfnShapes ffn_check(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                    const std::optional<Tensor>& b2) {
  check_cuda_tensor(x, "x", x);
  check_cuda_tensor(w1, "w1", x);
  check_cuda_tensor(w2, "w2", x);
  dtype_of(x, "x");
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 2 && w2.dim() == 2, "fastattn cuda: x ", x.sizes(), ", w1 ", w1.sizes(),
              ", w2 ", w2.sizes(), "; expected 2-D (T, D), (F, D), (D2, F)");
  FfnShapes s{x.size(0), x.size(1), w1.size(0), w2.size(0)};
  TORCH_CHECK(w1.size(1) == s.D && w2.size(1) == s.F, "fastattn cuda: w1 ", w1.sizes(), " and w2 ", w2.sizes(),
              " do not fit x ", x.sizes(), "; expected w1 (F, D), w2 (D2, F)");
  if (b1.has_value() && b1->defined()) {
    check_cuda_tensor(*b1, "b1", x);
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == s.F, "fastattn cuda: b1 ", b1->sizes(), "; expected (", s.F, ",)");
  }
  if (b2.has_value() && b2->defined()) {
    check_cuda_tensor(*b2, "b2", x);
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == s.D2, "fastattn cuda: b2 ", b2->sizes(), "; expected (", s.D2,
                ",)");
  }
  return s;
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
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const std::optional<Tensor> b1 = contig(b1_in), b2 = contig(b2_in);
  const FfnShapes s = ffn_check(x, w1, b1, w2, b2);
  const Activation act = activation_of(activation);
  const uint64_t seed_v = seed_value(dropout_p, seed);
  const DType dtype = dtype_of(x, "x");
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
    LtGemm g;
    g.transa = CUBLAS_OP_T;
    g.m = s.F;
    g.n = s.T;
    g.k = s.D;
    g.A = w1.data_ptr();
    g.lda = s.D;
    g.B = x.data_ptr();
    g.ldb = s.D;
    g.D = hidden.data_ptr();
    g.ldd = s.F;
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
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const Tensor dout = grad_out_in.contiguous(), pre = saved_in.contiguous();
  const std::optional<Tensor> b1 = contig(b1_in), b2 = contig(b2_in);
  const FfnShapes s = ffn_check(x, w1, b1, w2, b2);
  check_cuda_tensor(dout, "grad_out", x);
  check_cuda_tensor(pre, "saved", x);
  TORCH_CHECK(dout.dim() == 2 && dout.size(0) == s.T && dout.size(1) == s.D2, "fastattn cuda: grad_out ",
              dout.sizes(), "; expected (T, D2) = (", s.T, ", ", s.D2, ")");
  TORCH_CHECK(pre.dim() == 2 && pre.size(0) == s.T && pre.size(1) == s.F, "fastattn cuda: saved ", pre.sizes(),
              "; expected the pre-activation (T, F) = (", s.T, ", ", s.F,
              ") (ffn_fwd with save_for_backward=True)");
  const Activation act = activation_of(activation);
  const uint64_t seed_v = seed_value(dropout_p, seed);
  const DType dtype = dtype_of(x, "x");
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

  // dH = grad_out @ w2 (T, F); then dPre = dH * keep/(1-p) * act'(pre)
  bool db1_done = false;
  bool fused = false;
  if (p == 0.f && act == Activation::kGeluTanh && s.F % 8 == 0 && s.D2 > 0) {
    LtGemm g;  // col-major dPre^T (F x T) = w2^T (F x D2) * grad_out^T (D2 x T), DGELU + bias grad
    g.m = s.F;
    g.n = s.T;
    g.k = s.D2;
    g.A = w2.data_ptr();
    g.lda = s.F;
    g.B = dout.data_ptr();
    g.ldb = s.D2;
    g.D = dpre.data_ptr();
    g.ldd = s.F;
    g.epilogue = CUBLASLT_EPILOGUE_DGELU_BGRAD;
    g.bias = db1.data_ptr();
    g.aux = const_cast<void*>(pre.data_ptr());
    g.ld_aux = s.F;
    fused = lt_matmul(r, dtype, g);
    db1_done = fused;
    if (fused) {
      FA_CHECK_CUDA(ffn_activation_forward(dtype, act, pre.data_ptr(), nullptr, nullptr, hidden.data_ptr(), s.T,
                                           s.F, 0.f, 0, stream),
                    "ffn_bwd activation kernel");
    }
  }
  if (!fused) {
    LtGemm g;
    g.m = s.F;
    g.n = s.T;
    g.k = s.D2;
    g.A = w2.data_ptr();
    g.lda = s.F;
    g.B = dout.data_ptr();
    g.ldb = s.D2;
    g.D = dpre.data_ptr();
    g.ldd = s.F;
    if (s.D2 == 0) {
      dpre.zero_();
    } else if (!lt_matmul(r, dtype, g)) {
      at::mm_out(dpre, dout, w2);
    }
    FA_CHECK_CUDA(ffn_activation_backward(dtype, act, pre.data_ptr(), dpre.data_ptr(), hidden.data_ptr(),
                                          dpre.data_ptr(), s.T, s.F, p, seed_v, stream),
                  "ffn_bwd activation kernel");
  }

  // weight gradients: dW (rows x cols) = g^T (rows x T) @ a (T x cols), bias grad = column sums of g
  auto weight_grad = [&](const Tensor& gmat, const Tensor& amat, Tensor& dw, Tensor* db) {
    LtGemm g;  // col-major dW^T (cols x rows) = a^T (cols x T) * g (T x rows); BGRADB sums g over T
    g.transa = CUBLAS_OP_N;
    g.transb = CUBLAS_OP_T;
    g.m = amat.size(1);
    g.n = gmat.size(1);
    g.k = s.T;
    g.A = amat.data_ptr();
    g.lda = amat.size(1);
    g.B = gmat.data_ptr();
    g.ldb = gmat.size(1);
    g.D = dw.data_ptr();
    g.ldd = amat.size(1);
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
  {
    LtGemm g;
    g.m = s.D;
    g.n = s.T;
    g.k = s.F;
    g.A = w1.data_ptr();
    g.lda = s.D;
    g.B = dpre.data_ptr();
    g.ldb = s.F;
    g.D = dx.data_ptr();
    g.ldd = s.D;
    if (s.D > 0 && (s.F == 0 || !lt_matmul(r, dtype, g))) {
      if (s.F == 0) {
        dx.zero_();
      } else {
        at::mm_out(dx, dpre, w1);
      }
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
}
