// Autograd for the C++ ops (attention_fwd, ffn_fwd), registered under the Autograd dispatch key in
// C++ so that a call costs no Python round trip (the Triton ops keep their autograd in Python,
// fastattn/attention.py and fastattn/feed_forward.py). The backward of each is itself a registered
// op (attention_bwd, ffn_bwd), so torch.compile traces forward and backward whole.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The end of a forward: keeps the tensors and scalars its backward needs on ctx and returns
// {out, aux}, aux (the log-sum-exp / the saved pre-activation) marked non-differentiable.
variable_list saved_forward(AutogradContext* ctx, const at::Tensor& out, const at::Tensor& aux,
                            const variable_list& tensors,
                            std::initializer_list<std::pair<const char*, c10::IValue>> scalars) {
  ctx->save_for_backward(tensors);
  for (const auto& [name, value] : scalars) ctx->saved_data[name] = value;
  ctx->mark_non_differentiable({aux});
  return {out, aux};
}

// The ops are looked up at first use: their schemas are defined from Python after this library loads.
const auto& attention_fwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastattn::attention_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const OptTensor&,
                                                                 const OptTensor&, double, bool, double,
                                                                 const OptTensor&)>();
  return op;
}

const auto& attention_bwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastattn::attention_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, double,
                           bool, double, const OptTensor&)>();
  return op;
}

const auto& ffn_fwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastattn::ffn_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const OptTensor&, const at::Tensor&,
                                                                 const OptTensor&, c10::string_view, double,
                                                                 const OptTensor&, bool)>();
  return op;
}

const auto& ffn_bwd_op() {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn::ffn_bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
              const OptTensor&, const at::Tensor&, c10::string_view, double, const OptTensor&)>();
  return op;
}

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const OptTensor& attn_mask, const OptTensor& kpm,
                               double dropout_p, bool is_causal, double scale, const OptTensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attention_fwd_op().call(q, k, v, attn_mask, kpm, dropout_p, is_causal, scale, seed);
    return saved_forward(ctx, out, lse,
                         {q, k, v, out, lse, attn_mask.value_or(at::Tensor()), kpm.value_or(at::Tensor()),
                          seed.value_or(at::Tensor())},
                         {{"dropout_p", dropout_p}, {"is_causal", is_causal}, {"scale", scale}});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv] = attention_bwd_op().call(
        grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], opt(s[5]), opt(s[6]),
        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["is_causal"].toBool(),
        ctx->saved_data["scale"].toDouble(), opt(s[7]));
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct FFNFunction : public torch::autograd::Function<FFNFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                               const OptTensor& b1, const at::Tensor& w2, const OptTensor& b2,
                               c10::string_view activation, double dropout_p, const OptTensor& seed,
                               bool save_for_backward) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, saved] = ffn_fwd_op().call(x, w1, b1, w2, b2, activation, dropout_p, seed, save_for_backward);
    return saved_forward(
        ctx, out, saved,
        {x, w1, b1.value_or(at::Tensor()), w2, b2.value_or(at::Tensor()), saved, seed.value_or(at::Tensor())},
        {{"activation", std::string(activation)}, {"dropout_p", dropout_p}, {"saved", save_for_backward}});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w1 = s[1], &b1 = s[2], &w2 = s[3], &b2 = s[4];
    at::Tensor saved = s[5];
    if (!ctx->saved_data["saved"].toBool()) saved = at::linear(x, w1, opt(b1));  // forward did not save it: recompute
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    auto [dx, dw1, db1, dw2, db2] = ffn_bwd_op().call(grads[0].contiguous(), x, w1, opt(b1), w2, opt(b2), saved,
                                                      activation, ctx->saved_data["dropout_p"].toDouble(),
                                                      opt(s[6]));
    return {dx, dw1, b1.defined() ? db1 : at::Tensor(), dw2, b2.defined() ? db2 : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_fwd_autograd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const OptTensor& attn_mask,
                                                          const OptTensor& kpm, double dropout_p,
                                                          bool is_causal, double scale, const OptTensor& seed) {
  if (!(at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad()))) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to differentiate: no graph node
    return attention_fwd_op().call(q, k, v, attn_mask, kpm, dropout_p, is_causal, scale, seed);
  }
  auto r = AttentionFunction::apply(q, k, v, attn_mask, kpm, dropout_p, is_causal, scale, seed);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor> ffn_fwd_autograd(const at::Tensor& x, const at::Tensor& w1,
                                                    const OptTensor& b1, const at::Tensor& w2,
                                                    const OptTensor& b2, c10::string_view activation,
                                                    double dropout_p, const OptTensor& seed,
                                                    bool save_for_backward) {
  const auto needs = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
  if (!(at::GradMode::is_enabled() && (x.requires_grad() || w1.requires_grad() || w2.requires_grad() ||
                                       needs(b1) || needs(b2)))) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to differentiate: no graph node
    return ffn_fwd_op().call(x, w1, b1, w2, b2, activation, dropout_p, seed, save_for_backward);
  }
  auto r = FFNFunction::apply(x, w1, b1, w2, b2, activation, dropout_p, seed, save_for_backward);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("attention_fwd", &fastattn::attention_fwd_autograd);
  m.impl("ffn_fwd", &fastattn::ffn_fwd_autograd);
}
