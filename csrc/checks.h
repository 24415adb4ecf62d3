// The one argument check of each op family, shared by the CPU kernels (csrc/cpu/attention.cpp,
// csrc/cpu/feed_forward.cpp) and the CUDA ones (csrc/cuda/cuda_ops.cpp). The Python layer validates
// every public call before it reaches an op; these checks are for direct callers of
// torch.ops.fastattn.* and state the ops' contract (see csrc/fastattn.cpp). Each backend says what
// it serves (device, dtypes, largest head dim); everything else is common. After these checks the
// kernels keep only cheap internal asserts.
//
// Every failure is a ValueError in Python with one message style:
//   fastattn: argument 'X' got ...; expected ...
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "activation.h"

namespace fastattn {

// Fails with "fastattn: argument 'NAME' got <got...>; expected <expected...>" unless cond. The
// message parts are evaluated only on failure.
#define FASTATTN_CHECK_ARG(cond, name, got, expected) \
  TORCH_CHECK_VALUE(cond, "fastattn: argument '", name, "' got ", got, "; expected ", expected)

// torch's names (float32, bfloat16, ...), as the Python layer prints them.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kBool: return "bool";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    default: return c10::toString(t);
  }
}

inline std::string dtype_list(const std::vector<at::ScalarType>& dtypes) {
  std::ostringstream s;
  size_t i = 0;
  for (const auto t : dtypes) {
    if (i > 0) s << (i + 1 == dtypes.size() ? " or " : ", ");
    s << dtype_name(t);
    ++i;
  }
  return s.str();
}

inline bool dtype_in(at::ScalarType t, const std::vector<at::ScalarType>& dtypes) {
  for (const auto d : dtypes)
    if (d == t) return true;
  return false;
}

// What one backend's kernels serve (each backend holds one static instance per op family).
struct Serves {
  c10::DeviceType device;                     // kCPU or kCUDA
  std::vector<at::ScalarType> dtypes;  // of q/k/v (attention) or x/w/b (feed-forward)
  int64_t max_head_dim = std::numeric_limits<int64_t>::max();  // attention only
  // attention only: q, k, v (and the backward's grad_out, out) may be any strided views whose last
  // dim is contiguous, not only contiguous tensors
  bool strided_rows = false;
};

inline std::string device_text(const at::Tensor& t) {
  std::ostringstream s;
  s << "device " << t.device();
  return s.str();
}

// t lies on `like`'s device (which is of the backend's device type).
inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& like) {
  FASTATTN_CHECK_ARG(t.device() == like.device(), name, device_text(t), c10::str("the device of the other inputs, ", like.device()));
}

// dropout_p in [0, 1); when it is > 0, seed an int64 CPU tensor of shape (1,) (see csrc/philox.h). For
// inputs on CUDA (`like`) also (2,) (seed, counter offset): contiguous on like's device, where the kernels
// read it (fastattn/_philox.py new_seed draws it from the CUDA generator, capture-safe), or on the CPU.
inline void check_dropout(double dropout_p, const std::optional<at::Tensor>& seed, const at::Tensor& like) {
  FASTATTN_CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p", dropout_p, "a value in [0, 1)");
  if (dropout_p > 0.0) {
    const char* expected = like.is_cuda()
        ? "an int64 tensor: (2,) (seed, counter offset) on the inputs' device or on the CPU, or (1,) seed on the CPU"
        : "an int64 CPU tensor of shape (1,)";
    FASTATTN_CHECK_ARG(seed.has_value() && seed->defined(), "seed", "None", c10::str(expected, " when dropout_p > 0"));
    const at::Tensor& t = *seed;
    const bool cpu_ok = t.device().is_cpu() && (t.numel() == 1 || (like.is_cuda() && t.numel() == 2));
    const bool device_ok = like.is_cuda() && t.device() == like.device() && t.numel() == 2 && t.is_contiguous();
    FASTATTN_CHECK_ARG(t.scalar_type() == at::kLong && (cpu_ok || device_ok), "seed",
                       c10::str(dtype_name(t.scalar_type()), " ", t.sizes(), " on ", t.device()), expected);
  }
}

// ------------------------------------------------------------------------------------------------
// Attention: attention_fwd / attention_bwd.

// The dtype attn_mask must have when q has dtype q_dtype; every kernel reads the mask as this type.
// float32 (float64 for float64 q), whatever q's dtype: the mask is added at the kernels' accumulation
// precision, never rounded to q's dtype first (fp16 would turn -1e5 into -inf).
inline at::ScalarType expected_mask_dtype(at::ScalarType q_dtype) {
  return q_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

struct AttnShape {
  int64_t N, Hq, Hkv, L, S, E, Ev;
};

// q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev): contiguous (with serves.strided_rows: their last
// dim contiguous), one dtype the backend serves, on
// one device of its type, Hq % Hkv == 0, 1 <= E, Ev <= max_head_dim; attn_mask an additive
// (N, Hq, L, S) view (strides may be 0) of expected_mask_dtype(q); key_padding_mask bool (N, S)
// contiguous; dropout_p in [0, 1); seed an int64 CPU tensor of shape (1,) when dropout_p > 0.
inline AttnShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& attn_mask,
                                      const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                                      const std::optional<at::Tensor>& seed, const Serves& serves) {
  const char* names[3] = {"q", "k", "v"};
  const char* layouts[3] = {"(N, Hq, L, E)", "(N, Hkv, S, E)", "(N, Hkv, S, Ev)"};
  const at::Tensor* qkv[3] = {&q, &k, &v};
  FASTATTN_CHECK_ARG(q.device().type() == serves.device, "q", device_text(q),
                     c10::str("a ", c10::DeviceTypeName(serves.device, true), " tensor"));
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *qkv[i];
    FASTATTN_CHECK_ARG(t.dim() == 4, names[i], c10::str("shape ", t.sizes()), c10::str("a 4-D tensor ", layouts[i]));
    check_device(t, names[i], q);
    FASTATTN_CHECK_ARG(dtype_in(t.scalar_type(), serves.dtypes), names[i], c10::str("dtype ", dtype_name(t.scalar_type())),
                       dtype_list(serves.dtypes));
    FASTATTN_CHECK_ARG(t.scalar_type() == q.scalar_type(), names[i], c10::str("dtype ", dtype_name(t.scalar_type())),
                       c10::str("q's dtype ", dtype_name(q.scalar_type())));
    FASTATTN_CHECK_ARG(t.is_contiguous() || (serves.strided_rows && (t.size(3) <= 1 || t.stride(3) == 1)), names[i],
                       c10::str("strides ", t.strides()),
                       serves.strided_rows ? "a tensor whose last dim is contiguous" : "a contiguous tensor");
  }
  const AttnShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  FASTATTN_CHECK_ARG(k.size(0) == s.N, "k", c10::str("batch size ", k.size(0)), c10::str("q's batch size ", s.N));
  FASTATTN_CHECK_ARG(k.size(3) == s.E, "k", c10::str("head dim ", k.size(3)), c10::str("q's head dim ", s.E));
  FASTATTN_CHECK_ARG(v.size(0) == s.N && v.size(1) == s.Hkv && v.size(2) == s.S, "v", c10::str("shape ", v.sizes()),
                     c10::str("(N, Hkv, S, Ev) = (", s.N, ", ", s.Hkv, ", ", s.S, ", Ev) like k"));
  FASTATTN_CHECK_ARG((s.Hkv > 0 && s.Hq % s.Hkv == 0) || (s.Hq == 0 && s.Hkv == 0), "k", c10::str(s.Hkv, " heads"),
                     c10::str("a divisor of q's ", s.Hq, " heads (grouped-query attention)"));
  FASTATTN_CHECK_ARG(s.E >= 1 && s.E <= serves.max_head_dim, "q", c10::str("head dim ", s.E),
                     c10::str("a head dim in [1, ", serves.max_head_dim, "]"));
  FASTATTN_CHECK_ARG(s.Ev >= 1 && s.Ev <= serves.max_head_dim, "v", c10::str("head dim ", s.Ev),
                     c10::str("a head dim in [1, ", serves.max_head_dim, "]"));
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    check_device(m, "attn_mask", q);
    const at::ScalarType want = expected_mask_dtype(q.scalar_type());
    FASTATTN_CHECK_ARG(m.scalar_type() == want, "attn_mask", c10::str("dtype ", dtype_name(m.scalar_type())),
                       c10::str("an additive mask of dtype ", dtype_name(want)));
    FASTATTN_CHECK_ARG(
        m.dim() == 4 && m.size(0) == s.N && m.size(1) == s.Hq && m.size(2) == s.L && m.size(3) == s.S, "attn_mask",
        c10::str("shape ", m.sizes()),
        c10::str("an expanded (N, Hq, L, S) = (", s.N, ", ", s.Hq, ", ", s.L, ", ", s.S, ") view"));
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& m = *key_padding_mask;
    check_device(m, "key_padding_mask", q);
    FASTATTN_CHECK_ARG(m.scalar_type() == at::kBool, "key_padding_mask", c10::str("dtype ", dtype_name(m.scalar_type())),
                       "bool (True = key ignored)");
    FASTATTN_CHECK_ARG(m.dim() == 2 && m.size(0) == s.N && m.size(1) == s.S, "key_padding_mask",
                       c10::str("shape ", m.sizes()), c10::str("(N, S) = (", s.N, ", ", s.S, ")"));
    FASTATTN_CHECK_ARG(m.is_contiguous(), "key_padding_mask", c10::str("strides ", m.strides()), "a contiguous tensor");
  }
  check_dropout(dropout_p, seed, q);
  return s;
}

// The backward's extra inputs: grad_out and out (N, Hq, L, Ev) of q's dtype, lse (N, Hq, L) float32,
// all on q's device.
inline void check_attention_bwd_args(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& q, const AttnShape& s) {
  const char* names[2] = {"grad_out", "out"};
  const at::Tensor* ts[2] = {&grad_out, &out};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *ts[i];
    check_device(t, names[i], q);
    FASTATTN_CHECK_ARG(t.scalar_type() == q.scalar_type(), names[i], c10::str("dtype ", dtype_name(t.scalar_type())),
                       c10::str("q's dtype ", dtype_name(q.scalar_type())));
    FASTATTN_CHECK_ARG(t.sizes() == at::IntArrayRef({s.N, s.Hq, s.L, s.Ev}), names[i], c10::str("shape ", t.sizes()),
                       c10::str("(N, Hq, L, Ev) = (", s.N, ", ", s.Hq, ", ", s.L, ", ", s.Ev, ")"));
  }
  check_device(lse, "lse", q);
  FASTATTN_CHECK_ARG(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef({s.N, s.Hq, s.L}), "lse",
                     c10::str(dtype_name(lse.scalar_type()), " ", lse.sizes()),
                     c10::str("float32 (N, Hq, L) = (", s.N, ", ", s.Hq, ", ", s.L, ")"));
}

// ------------------------------------------------------------------------------------------------
// Feed-forward: ffn_fwd / ffn_bwd.

inline Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  FASTATTN_CHECK_ARG(false, "activation", c10::str("'", std::string(name), "'"), "'relu', 'gelu' or 'gelu_tanh'");
  return Activation::kRelu;
}

struct FfnShape {
  int64_t T, D, F, D2;
  Activation act;
};

// x (T, D) contiguous, w1 (F, D), b1 (F,)?, w2 (D2, F), b2 (D2,)?: one dtype the backend serves, on one
// device of its type; activation a known name; dropout_p in [0, 1); seed an int64 CPU tensor of
// shape (1,) when dropout_p > 0.
inline FfnShape check_ffn_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                               const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                               c10::string_view activation, double dropout_p, const std::optional<at::Tensor>& seed,
                               const Serves& serves) {
  FASTATTN_CHECK_ARG(x.device().type() == serves.device, "x", device_text(x),
                     c10::str("a ", c10::DeviceTypeName(serves.device, true), " tensor"));
  FASTATTN_CHECK_ARG(x.dim() == 2, "x", c10::str("shape ", x.sizes()), "a 2-D tensor (T, D)");
  FASTATTN_CHECK_ARG(dtype_in(x.scalar_type(), serves.dtypes), "x", c10::str("dtype ", dtype_name(x.scalar_type())),
                     dtype_list(serves.dtypes));
  FASTATTN_CHECK_ARG(x.is_contiguous(), "x", c10::str("strides ", x.strides()), "a contiguous tensor");
  const int64_t T = x.size(0), D = x.size(1);
  auto same = [&](const at::Tensor& t, const char* name) {
    check_device(t, name, x);
    FASTATTN_CHECK_ARG(t.scalar_type() == x.scalar_type(), name, c10::str("dtype ", dtype_name(t.scalar_type())),
                       c10::str("x's dtype ", dtype_name(x.scalar_type())));
  };
  same(w1, "w1");
  FASTATTN_CHECK_ARG(w1.dim() == 2 && w1.size(1) == D, "w1", c10::str("shape ", w1.sizes()),
                     c10::str("(F, D) with D = ", D, " (x's last dim)"));
  const int64_t F = w1.size(0);
  same(w2, "w2");
  FASTATTN_CHECK_ARG(w2.dim() == 2 && w2.size(1) == F, "w2", c10::str("shape ", w2.sizes()),
                     c10::str("(D2, F) with F = ", F, " (w1's rows)"));
  const int64_t D2 = w2.size(0);
  if (b1.has_value() && b1->defined()) {
    same(*b1, "b1");
    FASTATTN_CHECK_ARG(b1->dim() == 1 && b1->size(0) == F, "b1", c10::str("shape ", b1->sizes()), c10::str("(", F, ",)"));
  }
  if (b2.has_value() && b2->defined()) {
    same(*b2, "b2");
    FASTATTN_CHECK_ARG(b2->dim() == 1 && b2->size(0) == D2, "b2", c10::str("shape ", b2->sizes()), c10::str("(", D2, ",)"));
  }
  const Activation act = parse_activation(activation);
  check_dropout(dropout_p, seed, x);
  return {T, D, F, D2, act};
}

// The backward's extra inputs: grad_out (T, D2) and saved (T, F, the pre-activation ffn_fwd returned
// with save_for_backward=True), of x's dtype on x's device.
inline void check_ffn_bwd_args(const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& x,
                               const FfnShape& s) {
  const char* names[2] = {"grad_out", "saved"};
  const at::Tensor* ts[2] = {&grad_out, &saved};
  const int64_t cols[2] = {s.D2, s.F};
  const char* what[2] = {"(T, D2)", "(T, F), the pre-activation of ffn_fwd(save_for_backward=True),"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *ts[i];
    check_device(t, names[i], x);
    FASTATTN_CHECK_ARG(t.scalar_type() == x.scalar_type(), names[i], c10::str("dtype ", dtype_name(t.scalar_type())),
                       c10::str("x's dtype ", dtype_name(x.scalar_type())));
    FASTATTN_CHECK_ARG(t.dim() == 2 && t.size(0) == s.T && t.size(1) == cols[i], names[i], c10::str("shape ", t.sizes()),
                       c10::str(what[i], " = (", s.T, ", ", cols[i], ")"));
  }
}

}  // namespace fastattn
