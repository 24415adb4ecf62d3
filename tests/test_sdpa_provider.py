"""fastattn.enable_sdpa(): torch's own F.scaled_dot_product_attention served by fastattn's kernels.

Every numerical check is against a float64 run of torch's SDPA with the bound of fastattn.testing
(2 x torch's own same-dtype error + floor); the profiler proves which kernels ran.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

import fastattn
from fastattn import _philox, _sdpa_flash, sdpa
from fastattn.testing import check_bound

OP = "aten::scaled_dot_product_attention"


def _kernels_run(fn):
    """(result of fn(), set of fastattn op names and torch attention kernel names the profiler saw)."""
    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    names = {e.key for e in prof.key_averages()}
    return result, {n for n in names if n.startswith("fastattn::") or "scaled_dot_product" in n}


def _fastattn_ops(names):
    return {n for n in names if n.startswith("fastattn::")}


def _inputs(dtype, n=2, hq=4, hkv=4, l=12, s=12, e=16, ev=16, three_d=False):
    q = torch.randn(n, hq, l, e, dtype=dtype)
    k = torch.randn(n, hkv, s, e, dtype=dtype)
    v = torch.randn(n, hkv, s, ev, dtype=dtype)
    if three_d:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    return [t.requires_grad_() for t in (q, k, v)]


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal_rect": dict(is_causal=True, shape=dict(l=7, s=12)),
    "scale": dict(scale=0.3),
    "bool_mask": dict(mask="bool"),
    "float_mask": dict(mask="float"),
    "bool_mask_bcast_keys": dict(mask="bool_keys"),
    "gqa": dict(enable_gqa=True, shape=dict(hq=4, hkv=2)),
    "gqa_causal_mask": dict(enable_gqa=True, mask="float", shape=dict(hq=6, hkv=2)),
    "three_d": dict(shape=dict(three_d=True), mask="bool3"),
    "value_dim": dict(shape=dict(ev=8)),
}


def _mask(kind, dtype, n, hq, l, s):
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(n, 1, l, s) > 0.3
        m[..., 0] = True  # every row sees a key
        return m
    if kind == "bool_keys":  # a key-padding style (N, 1, 1, S) mask
        m = torch.ones(n, 1, 1, s, dtype=torch.bool)
        m[0, ..., s - 3:] = False
        return m
    if kind == "bool3":
        m = torch.rand(l, s) > 0.3
        m[:, 0] = True
        return m
    return torch.randn(n, hq, l, s, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_results_and_grads_match_torch(case, dtype):
    spec = CASES[case]
    shape = dict(spec.get("shape", {}))
    q, k, v = _inputs(dtype, **shape)
    three_d = shape.get("three_d", False)
    n = q.shape[0]
    hq = 1 if three_d else q.shape[1]
    l, s = q.shape[-2], k.shape[-2]
    mask = _mask(spec.get("mask"), dtype, n, hq, l, s)
    kw = dict(attn_mask=mask, is_causal=spec.get("is_causal", False), scale=spec.get("scale"),
              enable_gqa=spec.get("enable_gqa", False))
    go = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=dtype)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask64 = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    ref = F.scaled_dot_product_attention(q64, k64, v64, **{**kw, "attn_mask": mask64})
    ref_grads = _grads(ref, (q64, k64, v64), go.double())
    peer = F.scaled_dot_product_attention(q, k, v, **kw)
    peer_grads = _grads(peer, (q, k, v), go)

    with fastattn.enable_sdpa():
        def run():
            o = F.scaled_dot_product_attention(q, k, v, **kw)
            return o, _grads(o, (q, k, v), go)

        (out, grads), seen = _kernels_run(run)
    assert _fastattn_ops(seen) == {"fastattn::attention_fwd", "fastattn::attention_bwd"}, seen
    check_bound(f"{case} out", out, peer, ref)
    for name, g, pg, rg in zip("qkv", grads, peer_grads, ref_grads):
        check_bound(f"{case} d{name}", g, pg, rg)


def test_dropout_draws_from_torchs_generator_and_matches_its_mask():
    p = 0.3
    q, k, v = _inputs(torch.float32, l=10, s=14)
    go = torch.randn(2, 4, 10, 16)
    with fastattn.enable_sdpa():
        torch.manual_seed(123)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        grads = _grads(out, (q, k, v), go)
        torch.manual_seed(123)
        again = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    assert torch.equal(out, again), "torch.manual_seed must reproduce the dropout mask"
    torch.manual_seed(123)
    keep = _philox.attention_keep_mask(_philox.new_seed(), p, 2, 4, 10, 14)
    assert 0.5 < keep.float().mean().item() < 0.9

    def formula(dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        prob = torch.softmax(qq @ kk.transpose(-1, -2) / math.sqrt(16), dim=-1)
        o = (prob * keep / (1 - p)) @ vv
        return o, _grads(o, (qq, kk, vv), go.to(dtype))

    ref, ref_grads = formula(torch.float64)
    peer, peer_grads = formula(torch.float32)
    check_bound("dropout out", out, peer, ref)
    for name, g, pg, rg in zip("qkv", grads, peer_grads, ref_grads):
        check_bound(f"dropout d{name}", g, pg, rg)


def test_profiler_shows_fastattn_only_while_enabled_and_removal_restores_torch_exactly():
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    table_before = torch._C._dispatch_dump_table(OP)
    before, seen = _kernels_run(lambda: F.scaled_dot_product_attention(q, k, v))
    assert not _fastattn_ops(seen) and "aten::_scaled_dot_product_flash_attention_for_cpu" in seen

    handle = fastattn.enable_sdpa()
    assert torch._C._dispatch_dump_table(OP) != table_before
    _, seen = _kernels_run(lambda: F.scaled_dot_product_attention(q, k, v))
    assert _fastattn_ops(seen) == {"fastattn::attention_fwd"}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in seen
    handle.remove()

    assert torch._C._dispatch_dump_table(OP) == table_before
    after, seen = _kernels_run(lambda: F.scaled_dot_product_attention(q, k, v))
    assert not _fastattn_ops(seen) and "aten::_scaled_dot_product_flash_attention_for_cpu" in seen
    assert torch.equal(before, after)


def test_nested_and_repeated_enables():
    table_before = torch._C._dispatch_dump_table(OP)
    outer = fastattn.enable_sdpa()
    with fastattn.enable_sdpa(backend="cpu") as inner:
        assert sdpa.sdpa_enabled() and inner.active
        again = fastattn.enable_sdpa()
        outer.remove()
        outer.remove()  # idempotent
        assert sdpa.sdpa_enabled()
        again.remove()
    assert not inner.active and not sdpa.sdpa_enabled()
    assert torch._C._dispatch_dump_table(OP) == table_before
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    _, seen = _kernels_run(lambda: F.scaled_dot_product_attention(q, k, v))
    assert not _fastattn_ops(seen)


def test_bad_backend_name_is_a_clear_error():
    with pytest.raises(ValueError, match="argument 'backend' got 'fast'"):
        fastattn.enable_sdpa(backend="fast")
    assert not sdpa.sdpa_enabled()


@pytest.mark.parametrize("what", ["head_dim_300", "mask_requires_grad", "float64_mask_for_float32", "int_mask"])
def test_calls_fastattn_cannot_serve_fall_through_to_torch(what):
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    mask = None
    if what == "head_dim_300":
        q, k, v = (torch.randn(1, 2, 5, 300) for _ in range(3))
    elif what == "mask_requires_grad":
        mask = torch.randn(12, 12, requires_grad=True)
    elif what == "float64_mask_for_float32":
        mask = torch.randn(12, 12, dtype=torch.float64)
    elif what == "int_mask":
        mask = torch.ones(12, 12, dtype=torch.int64)
    assert sdpa.sdpa_decline_reason(q, k, v, mask) is not None

    def torch_run():
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        except RuntimeError as exc:
            return exc

    expected = torch_run()
    with fastattn.enable_sdpa():
        got, seen = _kernels_run(torch_run)
    assert not _fastattn_ops(seen)
    if isinstance(expected, Exception):  # torch's own error, unchanged
        assert type(got) is type(expected) and str(got) == str(expected)
    else:
        assert torch.equal(got, expected)
    if what == "mask_requires_grad":
        with fastattn.enable_sdpa():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
        assert mask.grad is not None and mask.grad.abs().sum() > 0


def test_sdpa_kernel_without_flash_keeps_torchs_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.detach() for t in _inputs(torch.float32))
    with fastattn.enable_sdpa():
        with sdpa_kernel([SDPBackend.MATH]):
            _, seen = _kernels_run(lambda: F.scaled_dot_product_attention(q, k, v))
        assert not _fastattn_ops(seen)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
            _, seen = _kernels_run(lambda: F.scaled_dot_product_attention(q, k, v))
        assert _fastattn_ops(seen) == {"fastattn::attention_fwd"}


def test_torch_func_transforms_keep_torchs_kernels_quietly():
    x = torch.randn(2, 4, 8, 16)

    def loss(a):
        return F.scaled_dot_product_attention(a, a, a).sum()

    want = torch.func.grad(loss)(x)
    with fastattn.enable_sdpa(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastattn")
        got = torch.func.grad(loss)(x)
        batched = torch.vmap(lambda a: F.scaled_dot_product_attention(a, a, a))(x.unsqueeze(1))
    assert torch.equal(got, want)
    assert torch.equal(batched, torch.vmap(lambda a: F.scaled_dot_product_attention(a, a, a))(x.unsqueeze(1)))


def test_invalid_call_gets_torchs_own_error():
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    k = k[..., :8]  # key head dim differs from the query's
    with pytest.raises(RuntimeError) as want:
        F.scaled_dot_product_attention(q, k, v)
    with fastattn.enable_sdpa(), pytest.raises(RuntimeError) as got:
        F.scaled_dot_product_attention(q, k, v)
    assert str(got.value) == str(want.value)


def test_an_error_inside_fastattn_never_breaks_torchs_sdpa(monkeypatch):
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    expected = F.scaled_dot_product_attention(q, k, v)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(sdpa, "_serve", broken)
    with fastattn.enable_sdpa():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(got, expected)
    assert any("simulated kernel failure" in str(w.message) for w in caught)

    # a failure while registering leaves torch's table untouched and nothing enabled
    table_before = torch._C._dispatch_dump_table(OP)
    monkeypatch.setattr(sdpa, "_device_types", lambda: ("CPU", "NoSuchDevice"))
    with pytest.raises(Exception):
        fastattn.enable_sdpa()
    assert not sdpa.sdpa_enabled()
    assert torch._C._dispatch_dump_table(OP) == table_before
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), expected)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(compiler):
    torch._dynamo.reset()
    q, k, v = _inputs(torch.float32, hq=4, hkv=2)
    mask = torch.rand(12, 12) > 0.2
    mask[:, 0] = True

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    ref = fn(*(t.detach().double() for t in (q, k, v)))
    peer = fn(q, k, v)
    with fastattn.enable_sdpa():
        compiled = torch.compile(fn, fullgraph=True, backend=compiler)
        (out, grads), seen = _kernels_run(lambda: (lambda o: (o, torch.autograd.grad(o.sum(), (q, k, v))))(
            compiled(q, k, v)))
    assert {"fastattn::attention_fwd", "fastattn::attention_bwd"} <= _fastattn_ops(seen)
    check_bound("compiled out", out, peer, ref)
    peer_grads = torch.autograd.grad(peer.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(fn(q64, k64, v64).sum(), (q64, k64, v64))
    for name, g, pg, rg in zip("qkv", grads, peer_grads, ref_grads):
        check_bound(f"compiled d{name}", g, pg, rg)
    torch._dynamo.reset()


def test_unconverted_transformer_encoder_layer_in_train_mode_runs_fastattn():
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).train()
    x = torch.randn(2, 9, 32)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    ref = layer.double()(x.double(), src_key_padding_mask=kpm)
    layer.float()
    peer = layer(x, src_key_padding_mask=kpm)
    with fastattn.enable_sdpa():
        out, seen = _kernels_run(lambda: layer(x, src_key_padding_mask=kpm))
        _, seen_bwd = _kernels_run(lambda: out.sum().backward())
    assert "fastattn::attention_fwd" in seen and "fastattn::attention_bwd" in seen_bwd
    check_bound("encoder layer", out, peer, ref)

    mha = torch.nn.MultiheadAttention(32, 4, dropout=0.2, batch_first=True).train()
    with fastattn.enable_sdpa():
        _, seen = _kernels_run(lambda: mha(x, x, x, need_weights=False)[0].sum().backward())
    assert {"fastattn::attention_fwd", "fastattn::attention_bwd"} <= seen


def test_inference_mode_is_served_too():
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    peer = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with fastattn.enable_sdpa(), torch.inference_mode():
        out, seen = _kernels_run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert _fastattn_ops(seen) == {"fastattn::attention_fwd"}
    check_bound("inference mode", out, peer, ref)


@pytest.mark.skipif(not hasattr(torch.nn.attention, "register_flash_attention_impl"),
                    reason="torch has no flash-attention provider registry (before 2.13)")
def test_registered_with_torch_but_never_active_on_import():
    from torch.nn import attention

    assert "fastattn" in attention.list_flash_attention_impls()
    assert attention.current_flash_attention_impl() != "fastattn" and not sdpa.sdpa_enabled()
    attention.activate_flash_attention_impl("fastattn")
    try:
        assert attention.current_flash_attention_impl() == "fastattn" and sdpa.sdpa_enabled()
        q, k, v = (t.detach() for t in _inputs(torch.float32))
        _, seen = _kernels_run(lambda: F.scaled_dot_product_attention(q, k, v))
        assert _fastattn_ops(seen) == {"fastattn::attention_fwd"}
    finally:
        attention.restore_flash_attention_impl()
    assert not sdpa.sdpa_enabled()


def test_cuda_registration_logic(monkeypatch):
    """The CUDA half registers under AutogradCUDA/CUDA and goes away on removal (no GPU needed)."""
    monkeypatch.setattr(sdpa, "_device_types", lambda: ("CPU", "CUDA"))
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert not has(OP, "AutogradCUDA") or not sdpa.sdpa_enabled()
    base = has(OP, "AutogradCUDA")
    flash = ["aten::" + name for name in (_sdpa_flash.FLASH_FWD, _sdpa_flash.FLASH_BWD)]
    tables = [torch._C._dispatch_dump_table(op) for op in [OP] + flash]
    with fastattn.enable_sdpa():
        assert has(OP, "AutogradCUDA") and has(OP, "CUDA") and has(OP, "AutogradCPU")
        assert all(has(op, "CUDA") for op in flash)
    assert has(OP, "AutogradCUDA") == base
    assert [torch._C._dispatch_dump_table(op) for op in [OP] + flash] == tables
    # which op a CUDA call would run, by build
    monkeypatch.setattr(sdpa.ops, "has_kernel", lambda op, key: True)
    assert sdpa._op_for("cuda", None) == ("cpp", None)
    assert sdpa._op_for("cuda", "cpu")[0] is None
    monkeypatch.setattr(sdpa.ops, "has_kernel", lambda op, key: key != "CUDA")
    monkeypatch.setattr(sdpa, "_triton_importable", lambda: True)
    assert sdpa._op_for("cuda", None) == ("triton", None)
    assert sdpa._op_for("cuda", "cuda")[0] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_results_and_grads_match_torch(dtype):
    q, k, v = (t.detach().cuda().requires_grad_() for t in _inputs(dtype, hq=8, hkv=2, l=64, s=64, e=64, ev=64))
    go = torch.randn_like(q)
    kw = dict(is_causal=True, enable_gqa=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, **kw)
    ref_grads = _grads(ref, (q64, k64, v64), go.double())
    peer = F.scaled_dot_product_attention(q, k, v, **kw)
    peer_grads = _grads(peer, (q, k, v), go)
    with fastattn.enable_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, **kw)
        grads = _grads(out, (q, k, v), go)
        assert sdpa.stats["served"] > 0
    check_bound("cuda out", out, peer, ref)
    for name, g, pg, rg in zip("qkv", grads, peer_grads, ref_grads):
        check_bound(f"cuda d{name}", g, pg, rg)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_cuda_flash_kernels_logic_on_cpu_tensors(dropout_p):
    """The flash-level kernels registered for CUDA, run on CPU tensors (the same fastattn ops serve
    both devices): layouts, lse, GQA, the seed carried in rng_state from forward to backward."""
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, L, E) views of BLHE
               for t in _inputs(torch.float32, hq=4, hkv=2, l=9, s=11))
    go = torch.randn(2, 4, 9, 16)
    torch.manual_seed(7)
    out, lse, _, _, max_q, max_k, rng_state, offset, debug = _sdpa_flash.flash_forward(
        q, k, v, dropout_p, True, scale=0.2)
    assert (max_q, max_k) == (9, 11) and lse.dtype == torch.float32 and lse.shape == (2, 4, 9)
    assert rng_state.dtype == torch.uint64 and rng_state.shape == (2,)
    dq, dk, dv = _sdpa_flash.flash_backward(go, q, k, v, out, lse, None, None, 9, 11, dropout_p, True, rng_state,
                                           offset, scale=0.2)
    keep = torch.ones(2, 4, 9, 11, dtype=torch.bool)
    if dropout_p:
        torch.manual_seed(7)
        keep = _philox.attention_keep_mask(_philox.new_seed(), dropout_p, 2, 4, 9, 11)

    def formula(dtype):
        qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
        kr, vr = kk.repeat_interleave(2, dim=1), vv.repeat_interleave(2, dim=1)
        s = (qq @ kr.transpose(-1, -2)) * 0.2
        s = s.masked_fill(torch.ones(9, 11, dtype=torch.bool).tril().logical_not(), float("-inf"))
        o = (torch.softmax(s, -1) * keep / (1 - dropout_p)) @ vr
        return o, _grads(o, (qq, kk, vv), go.to(dtype)), torch.logsumexp(s, -1)

    ref, ref_grads, ref_lse = formula(torch.float64)
    peer, peer_grads, peer_lse = formula(torch.float32)
    check_bound("flash out", out, peer, ref)
    check_bound("flash lse", lse, peer_lse, ref_lse)
    for name, g, pg, rg in zip("qkv", (dq, dk, dv), peer_grads, ref_grads):
        check_bound(f"flash d{name}", g, pg, rg)
    with pytest.raises(RuntimeError, match="return_debug_mask"):
        _sdpa_flash.flash_forward(q, k, v, 0.0, False, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_flash_op_override_matches_torchs_flash():
    q, k, v = (torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)
    flash = torch.ops.aten._scaled_dot_product_flash_attention.default
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    ref_grads = _grads(ref, (q64, k64, v64), go.double())
    peer = flash(q, k, v, 0.0, True)[0]
    peer_grads = _grads(peer, (q, k, v), go)
    with fastattn.enable_sdpa():
        (out, grads), seen = _kernels_run(lambda: (lambda o: (o, _grads(o, (q, k, v), go)))(flash(q, k, v, 0.0, True)[0]))
    assert {"fastattn::attention_fwd", "fastattn::attention_bwd"} <= _fastattn_ops(seen) or \
        {"fastattn::triton_attention_fwd", "fastattn::triton_attention_bwd"} <= _fastattn_ops(seen), seen
    check_bound("flash op out", out, peer, ref)
    for name, g, pg, rg in zip("qkv", grads, peer_grads, ref_grads):
        check_bound(f"flash op d{name}", g, pg, rg)
