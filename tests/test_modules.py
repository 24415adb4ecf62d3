"""fastattn.MultiheadAttention / TransformerEncoderLayer / convert against the torch.nn modules they replace.

Every parity case loads identical weights into both modules, runs them in float64 (so any difference
is a real one, not rounding) and compares outputs, input gradients and every parameter's gradient.
The attention runs on the "reference" backend; the kernels themselves are covered by the
conformance matrix.
"""
import copy
import warnings

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattn
import fastattn.attention
from fastattn.testing import check_bound, check_peer
from fastattn.modules import MultiheadAttention, TransformerEncoderLayer, convert

BACKEND = "reference"
# The parity tests that matter for the kernels' direct path also run on the "cpu" backend (float64 is
# one of its dtypes): there the modules call the C++ ops themselves (fastattn/modules.py).
BACKENDS = ["reference", "cpu"]
DT = torch.float64
E, H = 8, 2
L, S, N = 5, 7, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (tests/conftest.py)


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Every parameter random (torch initialises several biases to 0, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def _close(got, want, what: str, atol=None, rtol=None):
    check_peer(what, got, want, atol, rtol)


def _grads(module: nn.Module) -> dict:
    return {n: p.grad for n, p in module.named_parameters()}


def _compare_grads(ours: nn.Module, theirs: nn.Module, what: str, **tol):
    g_ours, g_theirs = _grads(ours), _grads(theirs)
    assert g_ours.keys() == g_theirs.keys()
    for name in g_theirs:
        assert g_theirs[name] is not None, f"{what}: torch left {name}.grad None"
        assert g_ours[name] is not None, f"{what}: fastattn left {name}.grad None"
        _close(g_ours[name], g_theirs[name], f"{what}: grad of {name}", **tol)


# -- MultiheadAttention -----------------------------------------------------------------------------

MHA_CONFIGS = {
    "default": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 6, "vdim": 5},
    "batch_first": {"batch_first": True},
    "batch_first_kdim_vdim_bias_kv": {"batch_first": True, "kdim": 6, "vdim": 5, "add_bias_kv": True},
}


def _mha_pair(config: dict, dropout: float = 0.0, seed: int = 0, backend: str = BACKEND):
    theirs = nn.MultiheadAttention(E, H, dropout=dropout, dtype=DT, **config)
    _randomize(theirs, seed)
    ours = MultiheadAttention(E, H, dropout=dropout, dtype=DT, backend=backend, **config)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _visible_bool(shape, gen, p=0.35):
    """A bool 'True = masked out' mask whose first key column stays visible (no fully masked row)."""
    m = torch.rand(shape, generator=gen) < p
    m[..., 0] = False
    return m


def _masks(kind: str, n: int, l: int, s: int, gen):
    kpm = attn = None
    if "kpm_bool" in kind:
        kpm = _visible_bool((n, s), gen)
    if "kpm_float" in kind:
        kpm = torch.randn(n, s, generator=gen, dtype=DT)
    if "attn2d_bool" in kind:
        attn = _visible_bool((l, s), gen)
    if "attn2d_float" in kind:
        attn = torch.randn(l, s, generator=gen, dtype=DT)
    if "attn3d_bool" in kind:
        attn = _visible_bool((n * H, l, s), gen)
    if "attn3d_float" in kind:
        attn = torch.randn(n * H, l, s, generator=gen, dtype=DT)
    return kpm, attn


MASK_KINDS = ["none", "kpm_bool", "kpm_float", "attn2d_bool", "attn2d_float", "attn3d_bool", "attn3d_float",
              "kpm_bool+attn2d_bool", "kpm_bool+attn3d_bool", "kpm_float+attn2d_float", "kpm_float+attn3d_float"]


def _mha_inputs(config: dict, kind_of_inputs: str, gen, batched=True):
    kd, vd = config.get("kdim", E), config.get("vdim", E)
    bf = config.get("batch_first", False)

    def make(seq, dim):
        shape = ((N, seq, dim) if bf else (seq, N, dim)) if batched else (seq, dim)
        return torch.randn(shape, generator=gen, dtype=DT, requires_grad=True)

    if kind_of_inputs == "self" and kd == E and vd == E:
        q = make(L, E)
        return q, q, q
    if kind_of_inputs == "shared_kv" and kd == vd:
        k = make(S, kd)
        return make(L, E), k, k
    return make(L, E), make(S, kd), make(S, vd)


def _run_mha(module, q, k, v, **kw):
    return module(q, k, v, **kw)


def _check_mha(config, inputs, mask_kind, mode, need_weights, average=True, backend=BACKEND):
    ours, theirs = _mha_pair(config, backend=backend)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    gen = torch.Generator().manual_seed(1)
    q, k, v = _mha_inputs(config, inputs, gen)
    same = q is k
    l_, s_ = (L, L) if same else (L, S)
    kpm, attn = _masks(mask_kind, N, l_, s_, gen)
    kw = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights, average_attn_weights=average)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "mismatched masks" deprecation (tested apart)
        out_t, w_t = theirs(q, k, v, **kw)
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
        if same:
            k2 = v2 = q2
        elif k is v:
            v2 = k2
        out_o, w_o = ours(q2, k2, v2, **kw)
    what = f"{config} inputs={inputs} masks={mask_kind} {mode} need_weights={need_weights}"
    assert out_o.shape == out_t.shape, what
    _close(out_o, out_t, f"{what}: output")
    if need_weights:
        _close(w_o, w_t, f"{what}: attention weights")
    else:
        assert w_o is None and w_t is None
    grad = torch.randn(out_t.shape, generator=gen, dtype=DT)
    (out_t * grad).sum().backward()
    (out_o * grad).sum().backward()
    for name, a, b in (("query", q2, q), ("key", k2, k), ("value", v2, v)):
        _close(a.grad, b.grad, f"{what}: grad of {name}")
    _compare_grads(ours, theirs, what)


# Every mask kind on two configurations; every configuration on the mask kinds that mix features.
MHA_CASES = ([("default", m) for m in MASK_KINDS] + [("batch_first_kdim_vdim_bias_kv", m) for m in MASK_KINDS]
             + [(c, m) for c in MHA_CONFIGS if c not in ("default", "batch_first_kdim_vdim_bias_kv")
                for m in ("none", "kpm_bool+attn2d_bool", "kpm_float+attn3d_float", "attn3d_bool")])


@pytest.mark.parametrize("config, mask_kind", MHA_CASES)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mha_matches_torch(config, mask_kind, mode, backend):
    _check_mha(MHA_CONFIGS[config], "cross", mask_kind, mode, need_weights=False, backend=backend)


@pytest.mark.parametrize("config", list(MHA_CONFIGS), ids=str)
@pytest.mark.parametrize("mask_kind, average", [("none", True), ("kpm_bool+attn2d_bool", False),
                                                ("kpm_float+attn3d_float", True)])
def test_mha_need_weights_matches_torch(config, mask_kind, average):
    _check_mha(MHA_CONFIGS[config], "cross", mask_kind, "train", need_weights=True, average=average)


@pytest.mark.parametrize("config", ["default", "no_bias", "bias_kv_zero_attn", "batch_first"])
@pytest.mark.parametrize("inputs", ["self", "shared_kv"])
@pytest.mark.parametrize("mask_kind", ["none", "kpm_bool", "attn3d_float"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mha_self_and_shared_kv_inputs(config, inputs, mask_kind, mode, backend):
    _check_mha(MHA_CONFIGS[config], inputs, mask_kind, mode, need_weights=False, backend=backend)


@pytest.mark.parametrize("config", ["default", "bias_kv_zero_attn", "kdim_vdim", "batch_first"])
@pytest.mark.parametrize("mask_kind, need_weights", [("none", True), ("kpm_bool", False),
                                                     ("kpm_float+attn2d_float", False), ("attn3d_bool", True)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mha_unbatched(config, mask_kind, need_weights, backend):
    cfg = MHA_CONFIGS[config]
    ours, theirs = _mha_pair(cfg, backend=backend)
    gen = torch.Generator().manual_seed(2)
    q, k, v = _mha_inputs(cfg, "cross", gen, batched=False)
    kpm, attn = _masks(mask_kind, 1, L, S, gen)
    kpm = None if kpm is None else kpm[0]  # (S,)
    if attn is not None and attn.dim() == 3:  # (num_heads, L, S) for an unbatched call
        attn = attn[:H]
    out_t, w_t = theirs(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_o, w_o = ours(q2, k2, v2, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
    assert out_o.shape == out_t.shape == (L, E)
    _close(out_o, out_t, "unbatched output")
    if need_weights:
        _close(w_o, w_t, "unbatched weights")
    out_t.sum().backward()
    out_o.sum().backward()
    _close(q2.grad, q.grad, "unbatched grad of query")
    _compare_grads(ours, theirs, "unbatched")


@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.bool, DT])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mha_is_causal_hint(with_kpm, need_weights, mask_dtype, backend):
    ours, theirs = _mha_pair({}, backend=backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(L, N, E, generator=gen, dtype=DT)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=DT)
    mask = causal if mask_dtype == DT else torch.isinf(causal)
    kpm = None
    if with_kpm:
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[1, 3:] = True
        kpm = kpm if mask_dtype == torch.bool else torch.zeros(N, L, dtype=DT).masked_fill(kpm, float("-inf"))
    want = theirs(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=need_weights, is_causal=True)[0]
    got = ours(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=need_weights, is_causal=True)[0]
    _close(got, want, "is_causal hint")


def test_mha_is_causal_needs_attn_mask():
    ours, theirs = _mha_pair({})
    x = torch.randn(L, N, E, dtype=DT)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        theirs(x, x, x, need_weights=False, is_causal=True)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x, x, x, need_weights=False, is_causal=True)


def test_mha_fully_padded_batch_row_is_zero_attention_not_nan():
    """A batch whose every key is padded gets 0 attention (so out_proj's bias), never NaN."""
    ours, theirs = _mha_pair({})
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(L, N, E, generator=gen, dtype=DT)
    k = torch.randn(S, N, E, generator=gen, dtype=DT)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1] = True
    kpm[2, 4:] = True
    want = theirs(q, k, k, key_padding_mask=kpm, need_weights=False)[0]
    got = ours(q, k, k, key_padding_mask=kpm, need_weights=False)[0]
    # torch gives NaN there (2.11) or 0 attention (newer math kernels); fastattn always gives 0.
    assert torch.isfinite(got).all()
    _close(got[:, 1], ours.out_proj.bias.expand(L, E), "fully padded batch -> out_proj.bias")
    _close(got[:, [0, 2]], want[:, [0, 2]], "the other batches")


def test_mha_eval_no_grad_matches_torch_native_fast_path():
    """Eval + no_grad + batch_first self-attention is where torch runs its native fused MHA."""
    ours, theirs = _mha_pair({"batch_first": True})
    ours.eval()
    theirs.eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, L, E, generator=gen, dtype=DT)
    kpm = _visible_bool((N, L), gen)
    with torch.no_grad():
        want = theirs(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        got = ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    _close(got, want, "eval no_grad")


def _spy_onednn_linear(monkeypatch, modules) -> list:
    """Every shape may take oneDNN (thresholds lowered); returns the list of weight shapes it is called with."""
    monkeypatch.setattr(modules, "_ONEDNN_MIN_K", 1)
    monkeypatch.setattr(modules, "_ONEDNN_MIN_MACS", 1)
    calls = []
    real = modules._onednn_linear
    monkeypatch.setattr(modules, "_onednn_linear", lambda *a: calls.append(a[1].shape) or real(*a))
    return calls


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kpm", [False, True])
def test_mha_no_grad_onednn_linears(monkeypatch, batch_first, kpm):
    """float32 without autograd: the in- and out-projections through oneDNN (thresholds lowered so small
    shapes take it), on the self-attention path and the general (masked) one; as torch, and torch's
    own linears while autograd records."""
    import fastattn.modules as modules
    if not modules._ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    calls = _spy_onednn_linear(monkeypatch, modules)
    theirs = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    _randomize(theirs)
    ours = convert(copy.deepcopy(theirs), backend="cpu")
    ours.eval()
    theirs.eval()
    gen = torch.Generator().manual_seed(23)
    x = torch.randn((N, L, 32) if batch_first else (L, N, 32), generator=gen)
    mask = _visible_bool((N, L), gen) if kpm else None
    with torch.no_grad():
        got = ours(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        want = theirs(x, x, x, key_padding_mask=mask, need_weights=False)[0]
    _close(got, want, f"oneDNN projections kpm={kpm} batch_first={batch_first}")
    assert [tuple(c) for c in calls] == [(96, 32), (32, 32)], calls
    # while autograd records: the same two linears through oneDNN (_OneDnnLinearFn), and in the backward
    # their input gradients (grad @ w as a linear on w.T); every gradient as torch's
    calls.clear()
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = ours(xo, xo, xo, key_padding_mask=mask, need_weights=False)[0]
    assert [tuple(c) for c in calls] == [(96, 32), (32, 32)] and got.requires_grad, calls
    _close(got.detach(), want, "the recording path")
    ref = theirs(xt, xt, xt, key_padding_mask=mask, need_weights=False)[0]
    dout = torch.randn(got.shape, generator=gen)
    got.backward(dout)
    ref.backward(dout)
    assert [tuple(c) for c in calls[2:]] == [(32, 32), (32, 96)], calls
    # every gradient within 3 x torch's own float32 error against float64 (the matrix's bound is 2x for one
    # op; through this chain -- two linears, fastattn's attention forward and backward -- the gradients
    # reach up to 2.3x over 6 seeds, the same with the linears on oneDNN or on addmm: the attention's share)
    theirs64, x64 = copy.deepcopy(theirs).double(), x.double().requires_grad_()
    for prm in theirs64.parameters():
        prm.grad = None
    theirs64(x64, x64, x64, key_padding_mask=mask, need_weights=False)[0].backward(dout.double())
    check_bound("oneDNN linears: grad of x", xo.grad, xt.grad, x64.grad, factor=3.0)
    for (name, a), b, c in zip(ours.named_parameters(), theirs.parameters(), theirs64.parameters()):
        check_bound(f"oneDNN linears: grad of {name}", a.grad, b.grad, c.grad, factor=3.0)


def test_mha_mismatched_mask_kinds_warn_like_torch():
    ours, theirs = _mha_pair({})
    x = torch.randn(L, N, E, dtype=DT)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    attn = torch.zeros(L, L, dtype=DT)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        theirs(x, x, x, key_padding_mask=kpm, attn_mask=attn, need_weights=False)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        ours(x, x, x, key_padding_mask=kpm, attn_mask=attn, need_weights=False)


@pytest.mark.parametrize("bad, match", [
    (dict(key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool)), "key_padding_mask"),
    (dict(key_padding_mask=torch.zeros(N, S, dtype=torch.int64)), "key_padding_mask"),
    (dict(attn_mask=torch.zeros(L, S + 2, dtype=torch.bool)), "attn_mask"),
    (dict(attn_mask=torch.zeros(N, L, S, dtype=torch.bool)), "attn_mask"),
])
def test_mha_bad_masks_name_the_argument(bad, match):
    ours, _ = _mha_pair({})
    q = torch.randn(L, N, E, dtype=DT)
    k = torch.randn(S, N, E, dtype=DT)
    with pytest.raises((AssertionError, RuntimeError, ValueError), match=match):
        ours(q, k, k, need_weights=False, **bad)


def test_mha_bad_feature_dim_names_the_argument():
    ours, _ = _mha_pair({"kdim": 6, "vdim": 5})
    q = torch.randn(L, N, E, dtype=DT)
    with pytest.raises(AssertionError, match="'key' got feature dim 8; expected 6"):
        ours(q, torch.randn(S, N, E, dtype=DT), torch.randn(S, N, 5, dtype=DT), need_weights=False)


def _spy(monkeypatch, name):
    calls = []
    home = fastattn.attention if name == "scaled_dot_product_attention" else sys.modules["fastattn.feed_forward"]
    real = getattr(home, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(home, name, spy)
    return calls


def test_mha_calls_fastattn_with_separate_padding_mask_backend_and_dropout(monkeypatch):
    calls = _spy(monkeypatch, "scaled_dot_product_attention")
    mha = MultiheadAttention(E, H, dropout=0.25, dtype=DT, backend="reference")
    x = torch.randn(L, N, E, dtype=DT)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, -1] = True
    mha.train()
    mha(x, x, x, key_padding_mask=kpm, need_weights=False)
    mha.eval()
    mha(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert len(calls) == 2
    (args_train, kw_train), (args_eval, kw_eval) = calls
    assert kw_train["key_padding_mask"] is kpm, "a bool padding mask must reach the API unmerged"
    assert args_train[3] is None, "no dense mask should be built for a bool padding mask alone"
    assert kw_train["backend"] == "reference"
    assert args_train[4] == 0.25 and args_eval[4] == 0.0, "dropout_p: the module's p in training, 0 in eval"
    q = args_train[0]
    assert q.shape == (N, H, L, E // H)


def test_mha_dropout_follows_torch_seed():
    mha = MultiheadAttention(E, H, dropout=0.5, dtype=DT, backend=BACKEND).train()
    x = torch.randn(L, N, E, dtype=DT)
    torch.manual_seed(7)
    a = mha(x, x, x, need_weights=False)[0]
    torch.manual_seed(7)
    b = mha(x, x, x, need_weights=False)[0]
    torch.manual_seed(8)
    c = mha(x, x, x, need_weights=False)[0]
    _close(a, b, "same seed, same dropout")
    assert not torch.allclose(a, c), "a different seed should draw a different dropout mask"
    mha.eval()
    ref = nn.MultiheadAttention(E, H, dropout=0.5, dtype=DT).eval()
    ref.load_state_dict(mha.state_dict())
    with torch.no_grad():
        _close(mha(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0], "eval ignores dropout")


@pytest.mark.parametrize("config", list(MHA_CONFIGS), ids=str)
def test_mha_state_dict_round_trip(config):
    cfg = MHA_CONFIGS[config]
    ours, theirs = _mha_pair(cfg)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = nn.MultiheadAttention(E, H, dtype=DT, **cfg)
    back.load_state_dict(ours.state_dict())  # strict: same names, same shapes
    for name, t in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert isinstance(ours, nn.MultiheadAttention)
    assert type(ours.out_proj) is type(theirs.out_proj)


# -- TransformerEncoderLayer --------------------------------------------------------------------------

D_MODEL, NHEAD, D_FF = 8, 2, 12

LAYER_CONFIGS = {
    "relu": {},
    "relu_str": {"activation": "relu"},
    "gelu_str": {"activation": "gelu"},
    "F.gelu": {"activation": F.gelu},
    "nn.ReLU": {"activation": nn.ReLU()},
    "nn.GELU": {"activation": nn.GELU()},
    "nn.GELU_tanh": {"activation": nn.GELU(approximate="tanh")},
    "callable_silu": {"activation": F.silu},
    "norm_first": {"norm_first": True},
    "no_bias": {"bias": False},
    "eps": {"layer_norm_eps": 1e-2},
    "batch_first": {"batch_first": True},
    "batch_first_norm_first_gelu": {"batch_first": True, "norm_first": True, "activation": "gelu"},
}


def _layer_pair(config: dict, dropout: float = 0.0, seed: int = 0, backend: str = BACKEND):
    theirs = nn.TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, dropout, dtype=DT, **copy.deepcopy(config))
    _randomize(theirs, seed)
    ours = TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, dropout, dtype=DT, backend=backend,
                                   **copy.deepcopy(config))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


LAYER_MASKS = ["none", "kpm_bool", "kpm_float", "attn2d_bool", "attn2d_float", "attn3d_float",
               "kpm_bool+attn2d_bool", "kpm_float+attn3d_float", "causal", "causal+kpm_bool"]


def _layer_masks(kind, gen):
    if kind.startswith("causal"):
        mask = nn.Transformer.generate_square_subsequent_mask(S, dtype=DT)
        kpm = _visible_bool((N, S), gen) if "kpm" in kind else None
        return kpm, mask, True
    kpm, attn = _masks(kind, N, S, S, gen)
    return kpm, attn, False


# Every mask kind on the default layer and one batch-first layer; every configuration on mixed masks.
LAYER_CASES = ([("relu", m) for m in LAYER_MASKS] + [("batch_first_norm_first_gelu", m) for m in LAYER_MASKS]
               + [(c, m) for c in LAYER_CONFIGS if c not in ("relu", "batch_first_norm_first_gelu")
                  for m in ("kpm_bool", "kpm_float+attn3d_float", "causal+kpm_bool")])


@pytest.mark.parametrize("config, mask_kind", LAYER_CASES)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:Support for mismatched")
def test_encoder_layer_matches_torch(config, mask_kind, mode, backend):
    cfg = LAYER_CONFIGS[config]
    ours, theirs = _layer_pair(cfg, backend=backend)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    gen = torch.Generator().manual_seed(11)
    bf = cfg.get("batch_first", False)
    x = torch.randn((N, S, D_MODEL) if bf else (S, N, D_MODEL), generator=gen, dtype=DT, requires_grad=True)
    kpm, mask, causal = _layer_masks(mask_kind, gen)
    want = theirs(x, src_mask=mask, src_key_padding_mask=kpm, is_causal=causal)
    x2 = x.detach().clone().requires_grad_()
    got = ours(x2, src_mask=mask, src_key_padding_mask=kpm, is_causal=causal)
    what = f"layer {config} masks={mask_kind} {mode}"
    _close(got, want, f"{what}: output")
    grad = torch.randn(want.shape, generator=gen, dtype=DT)
    (want * grad).sum().backward()
    (got * grad).sum().backward()
    _close(x2.grad, x.grad, f"{what}: grad of src")
    _compare_grads(ours, theirs, what)


@pytest.mark.parametrize("config", ["relu", "norm_first", "callable_silu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_layer_unbatched(config, backend):
    ours, theirs = _layer_pair(LAYER_CONFIGS[config], backend=backend)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(S, D_MODEL, generator=gen, dtype=DT)
    kpm = _visible_bool((S,), gen)
    _close(ours(x, src_key_padding_mask=kpm), theirs(x, src_key_padding_mask=kpm), f"unbatched {config}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kpm", [False, True])
def test_encoder_layer_eval_no_grad_matches_torch_fast_path(backend, kpm):
    """Eval + no_grad + batch_first is where torch runs its fused native encoder layer."""
    ours, theirs = _layer_pair({"batch_first": True}, backend=backend)
    ours.eval()
    theirs.eval()
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(N, S, D_MODEL, generator=gen, dtype=DT)
    mask = None
    if kpm:
        mask = torch.zeros(N, S, dtype=torch.bool)
        mask[0, 5:] = True
    with torch.no_grad():
        want, got = theirs(x, src_key_padding_mask=mask), ours(x, src_key_padding_mask=mask)
    _close(got, want, "eval no_grad", atol=1e-9)


@pytest.mark.parametrize("config", sorted(LAYER_CONFIGS))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_layer_no_grad_path_matches_grad_path(config, mode, backend):
    """Without autograd (no_grad, inference_mode) and masks the layer takes its no-grad path (residuals
    added in place into the sublayers' outputs, activation in place): same result as the recording path
    (train mode: same dropout draws from the same seed), as torch in eval, and the input is untouched."""
    cfg = LAYER_CONFIGS[config]
    ours, theirs = _layer_pair(cfg, dropout=0.2, backend=backend)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    gen = torch.Generator().manual_seed(21)
    x = torch.randn((N, S, D_MODEL) if cfg.get("batch_first") else (S, N, D_MODEL), generator=gen, dtype=DT)
    x_before = x.clone()
    torch.manual_seed(5)
    want = ours(x)
    for ctx in (torch.no_grad, torch.inference_mode):
        torch.manual_seed(5)
        with ctx():
            got = ours(x)
        _close(got, want.detach(), f"layer {config} {mode} under {ctx.__name__}", atol=1e-12, rtol=0)
        assert torch.equal(x, x_before), "the layer must not modify its input"
    if mode == "eval":
        with torch.no_grad():
            _close(ours(x), theirs(x), f"layer {config} eval no_grad vs torch")


@pytest.mark.parametrize("config", ["relu", "nn.GELU", "nn.GELU_tanh", "norm_first", "no_bias",
                                    "batch_first_norm_first_gelu", "callable_silu"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_encoder_layer_no_grad_onednn_linears(monkeypatch, config, mode):
    """float32 without autograd: the layers' GEMMs through oneDNN (thresholds lowered so small shapes take
    it), activation and residual fused there; same result as the recording path and as torch in eval."""
    import fastattn.modules as modules
    if not modules._ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    monkeypatch.setattr(modules, "_ONEDNN_MIN_K", 1)
    monkeypatch.setattr(modules, "_ONEDNN_MIN_MACS", 1)
    calls = []
    for name in ("_onednn_linear", "_onednn_linear_add"):
        real = getattr(modules, name)
        monkeypatch.setattr(modules, name, lambda *a, _real=real, _name=name: calls.append((_name, a[-3:])) or _real(*a))
    cfg = LAYER_CONFIGS[config]
    theirs = nn.TransformerEncoderLayer(32, 4, 48, 0.2, **copy.deepcopy(cfg))
    _randomize(theirs)
    ours = TransformerEncoderLayer(32, 4, 48, 0.2, backend="cpu", **copy.deepcopy(cfg))
    ours.load_state_dict(theirs.state_dict())
    ours.train(mode == "train")
    theirs.train(mode == "train")
    gen = torch.Generator().manual_seed(22)
    x = torch.randn((N, S, 32) if cfg.get("batch_first") else (S, N, 32), generator=gen)
    x_before = x.clone()
    torch.manual_seed(6)
    want = ours(x).detach()
    # while autograd records, the plain linears (no activation or residual to fuse) take oneDNN too
    # (_OneDnnLinearFn: its forward and input gradient; the weight gradients are torch's)
    # -- the in- and out-projections, and the feed-forward's two linears (few tokens: the layer's own
    # Linear -> activation -> Linear) unless the activation is a callable fastattn does not name
    n_rec = 2 if config == "callable_silu" else 4
    assert [(name, a) for name, a in calls] == [("_onednn_linear", ("none", [], ""))] * n_rec, calls
    for ctx in (torch.no_grad, torch.inference_mode):
        calls.clear()
        torch.manual_seed(6)
        with ctx():
            got = ours(x)
        assert torch.equal(x, x_before), "the layer must not modify its input"
        _close(got, want, f"oneDNN {config} {mode} under {ctx.__name__} vs the recording path")
        names = [c[0] for c in calls]
        # in-projection, out-projection (+ residual in eval), and linear1 / linear2 (+ residual in eval)
        # unless the activation is a callable fastattn does not name
        n_ffn = 0 if config == "callable_silu" else 2
        assert len(names) == 2 + n_ffn, calls
        assert names.count("_onednn_linear_add") == (0 if mode == "train" else 1 + n_ffn // 2), names
    if mode == "eval":
        with torch.no_grad():
            _close(ours(x), theirs(x), f"oneDNN {config} eval vs torch")


def _spy_direct(monkeypatch, name):
    """Count the modules' direct calls of a C++ op (fastattn.modules._attention_fwd / _ffn_fwd)."""
    import fastattn.modules as modules
    calls = []
    real = getattr(modules, name)

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(modules, name, spy)
    return calls


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "kpm_bool"])
def test_cpu_backend_modules_call_the_kernels_directly(monkeypatch, mode, batch_first, masks):
    """On the "cpu" backend the layer's attention and feed-forward reach the C++ ops straight from the
    module, with q, k, v (N, H, L, hd) views of the one in-projection's output (no copies: the CPU op
    reads strided rows), and match torch."""
    attn_calls = _spy_direct(monkeypatch, "_attention_fwd")
    ffn_calls = _spy_direct(monkeypatch, "_ffn_fwd")
    api_calls = _spy(monkeypatch, "scaled_dot_product_attention")
    monkeypatch.setattr(fastattn.modules, "_ffn_small", lambda tokens, d_model, d_ff=0: False)  # the fused op, always
    ours, theirs = _layer_pair({"batch_first": batch_first}, backend="cpu")
    ours.train(mode == "train")
    theirs.train(mode == "train")
    gen = torch.Generator().manual_seed(14)
    x = torch.randn((N, S, D_MODEL) if batch_first else (S, N, D_MODEL), generator=gen, dtype=DT,
                    requires_grad=True)
    kpm = _visible_bool((N, S), gen) if masks == "kpm_bool" else None
    want = theirs(x, src_key_padding_mask=kpm)
    x2 = x.detach().clone().requires_grad_()
    got = ours(x2, src_key_padding_mask=kpm)
    _close(got, want, f"direct path {mode} batch_first={batch_first} {masks}")
    assert len(attn_calls) == 1 and len(ffn_calls) == 1 and not api_calls
    q, k, v, mask, key_padding_mask = attn_calls[0][:5]
    assert all(t.stride(-1) == 1 and t.shape == (N, NHEAD, S, D_MODEL // NHEAD) for t in (q, k, v))
    assert not q.is_contiguous() and q.data_ptr() + D_MODEL * q.element_size() == k.data_ptr()
    assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
    assert mask is None and (key_padding_mask is None) == (kpm is None)
    assert ffn_calls[0][-1] is True, "a gradient is needed: the pre-activation must be saved"
    with torch.no_grad():
        _close(ours(x2, src_key_padding_mask=kpm), theirs(x, src_key_padding_mask=kpm), "direct path no_grad")
    assert ffn_calls[1][-1] is False, "under no_grad nothing is saved for a backward"
    (want.sum()).backward()
    (got.sum()).backward()
    _close(x2.grad, x.grad, "direct path: grad of src")
    _compare_grads(ours, theirs, "direct path")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cpu_backend_few_tokens_feed_forward_runs_as_torch_linears(monkeypatch, mode):
    """Below the fused feed-forward's break-even token count the layer runs torch's own Linear ->
    activation -> Dropout -> Linear (the kernel re-lays out both weights per call)."""
    import fastattn.modules as modules
    assert modules._ffn_small(N * S, D_MODEL) and not modules._ffn_small(4096, 64)
    assert not modules._ffn_small(4096, 1024) and modules._ffn_small(2048, 1024)
    # large weights (D·F >= 2^20): whole-matrix GEMMs whatever the token count; below, the fused op
    assert modules._ffn_small(1 << 16, 512, 2048) and modules._ffn_small(1 << 16, 1024, 4096)
    assert not modules._ffn_small(1 << 16, 256, 1024) and not modules._ffn_small(8192, 100, 2048)
    ffn_calls = _spy_direct(monkeypatch, "_ffn_fwd")
    api_calls = _spy(monkeypatch, "feed_forward")
    ours, theirs = _layer_pair({}, backend="cpu")
    ours.train(mode == "train")
    theirs.train(mode == "train")
    x = torch.randn(S, N, D_MODEL, dtype=DT, requires_grad=True)
    want = theirs(x)
    x2 = x.detach().clone().requires_grad_()
    got = ours(x2)
    assert not ffn_calls and not api_calls
    _close(got, want, f"few tokens {mode}")
    want.sum().backward()
    got.sum().backward()
    _close(x2.grad, x.grad, "few tokens: grad of src")
    _compare_grads(ours, theirs, "few tokens")


def test_reference_backend_modules_go_through_the_api(monkeypatch):
    attn_calls = _spy_direct(monkeypatch, "_attention_fwd")
    ffn_calls = _spy_direct(monkeypatch, "_ffn_fwd")
    api_calls = _spy(monkeypatch, "scaled_dot_product_attention")
    ours, _ = _layer_pair({}, backend="reference")
    ours(torch.randn(S, N, D_MODEL, dtype=DT))
    assert not attn_calls and not ffn_calls and len(api_calls) == 1


@pytest.mark.parametrize("config, name", [("relu", "relu"), ("relu_str", "relu"), ("nn.ReLU", "relu"),
                                          ("gelu_str", "gelu"), ("F.gelu", "gelu"), ("nn.GELU", "gelu"),
                                          ("nn.GELU_tanh", "gelu_tanh"), ("callable_silu", None)])
def test_encoder_layer_feed_forward_goes_through_fastattn(monkeypatch, config, name):
    calls = _spy(monkeypatch, "feed_forward")
    ours, _ = _layer_pair(LAYER_CONFIGS[config], dropout=0.2)
    x = torch.randn(S, N, D_MODEL, dtype=DT)
    ours.train()
    ours(x)
    ours.eval()
    ours(x)
    if name is None:
        assert calls == [], "an arbitrary callable activation must run as plain torch ops"
        return
    assert len(calls) == 2
    (args_t, kw_t), (args_e, _) = calls
    assert args_t[5] == name
    assert args_t[6] == 0.2 and args_e[6] == 0.0, "ffn dropout: self.dropout.p in training, 0 in eval"
    assert kw_t["backend"] == BACKEND
    assert args_t[1] is ours.linear1.weight and args_t[4] is ours.linear2.bias


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_encoder_layer_refuses_nested_tensors():
    ours, _ = _layer_pair({"batch_first": True})
    nested = torch.nested.nested_tensor([torch.randn(3, D_MODEL, dtype=DT), torch.randn(5, D_MODEL, dtype=DT)])
    with pytest.raises(ValueError, match="NestedTensor"):
        ours(nested)


@pytest.mark.parametrize("config", list(LAYER_CONFIGS), ids=str)
def test_encoder_layer_state_dict_round_trip(config):
    cfg = LAYER_CONFIGS[config]
    ours, theirs = _layer_pair(cfg)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    back = nn.TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, 0.0, dtype=DT, **copy.deepcopy(cfg))
    back.load_state_dict(ours.state_dict())
    for name, t in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert ours.activation_relu_or_gelu == theirs.activation_relu_or_gelu


def test_encoder_layer_bad_activation_names_the_argument():
    with pytest.raises(RuntimeError, match="'activation' got 'tanh'"):
        TransformerEncoderLayer(D_MODEL, NHEAD, activation="tanh")


# -- inside nn.TransformerEncoder -----------------------------------------------------------------------

def _nested_seen(encoder: nn.TransformerEncoder) -> list:
    seen = []
    for layer in encoder.layers:
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_nested))
    return seen


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (DT, 1e-10)])
def test_converted_encoder_never_gets_nested_tensors_and_matches_stock(dtype, atol):
    torch.manual_seed(0)
    stock = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, 0.1, batch_first=True, dtype=dtype), 2)
    stock.eval()
    assert stock.use_nested_tensor, "the stock encoder should take its NestedTensor path (test premise)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # convert() must not warn
        converted = convert(copy.deepcopy(stock), backend=BACKEND)
    assert all(type(layer) is TransformerEncoderLayer for layer in converted.layers)
    assert not converted.use_nested_tensor
    lengths = torch.tensor([6, 3, 1, 5])
    x = torch.randn(4, 6, 16, dtype=dtype)
    kpm = torch.arange(6).unsqueeze(0) >= lengths.unsqueeze(1)  # left-aligned padding, as nested tensors need
    seen_stock, seen_ours = _nested_seen(stock), _nested_seen(converted)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        want = stock(x, src_key_padding_mask=kpm)
        got = converted(x, src_key_padding_mask=kpm)
    assert seen_stock == [True, True], "stock encoder did not use NestedTensors; the comparison lost its point"
    assert seen_ours == [False, False]
    keep = ~kpm
    _close(got[keep], want[keep], "converted encoder, non-padded positions", atol=atol, rtol=atol)
    assert torch.isfinite(got).all()


def test_encoder_built_around_fastattn_layer():
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True, backend=BACKEND)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    ref.load_state_dict(enc.state_dict())
    enc.eval()
    ref.eval()
    seen = _nested_seen(enc)
    x = torch.randn(3, 5, 16)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4])
    with torch.no_grad():
        got, want = enc(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm)
    assert seen == [False, False]
    _close(got[~kpm], want[~kpm], "encoder of fastattn layers", atol=1e-5, rtol=1e-5)


# -- convert ------------------------------------------------------------------------------------------

class _Custom(nn.TransformerEncoderLayer):
    """A user's subclass: its own forward must survive, only its attention converts."""

    def forward(self, src, *args, **kwargs):
        return super().forward(src, *args, **kwargs) * 2.0


def test_convert_roots_and_idempotence():
    mha = nn.MultiheadAttention(E, H, dtype=DT)
    new = convert(mha, backend=BACKEND)
    assert type(new) is MultiheadAttention and new.backend == BACKEND
    assert new.in_proj_weight is mha.in_proj_weight, "convert keeps the very same Parameters"
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, dtype=DT)
    new_layer = convert(layer)
    assert type(new_layer) is TransformerEncoderLayer and type(new_layer.self_attn) is MultiheadAttention
    assert convert(new_layer, backend=BACKEND) is new_layer and new_layer.self_attn.backend == BACKEND
    with pytest.raises(TypeError, match="'module'"):
        convert("not a module")


def test_convert_keeps_parameters_mode_dtype_and_outputs():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "enc": nn.TransformerEncoder(nn.TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, 0.0, dtype=DT), 2,
                                     enable_nested_tensor=False),
        "dec": nn.TransformerDecoderLayer(D_MODEL, NHEAD, D_FF, 0.0, dtype=DT),
        "custom": _Custom(D_MODEL, NHEAD, D_FF, 0.0, dtype=DT),
    })
    _randomize(model)
    model.train()
    model["enc"].layers[1].eval()  # mixed modes must survive
    x = torch.randn(S, N, D_MODEL, dtype=DT)
    mem = torch.randn(L, N, D_MODEL, dtype=DT)

    def run(m):
        return m["enc"](x) + m["dec"](x, mem) + m["custom"](x)

    want = run(model)
    params_before = dict(model.named_parameters())
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert(model, backend=BACKEND)
    assert converted is model
    assert dict(model.named_parameters()).keys() == params_before.keys()
    for name, p in model.named_parameters():
        assert p is params_before[name], f"{name} is no longer the same Parameter"
        assert p.dtype == DT
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd_before.items())
    assert all(type(layer) is TransformerEncoderLayer for layer in model["enc"].layers)
    assert type(model["dec"].self_attn) is MultiheadAttention
    assert type(model["dec"].multihead_attn) is MultiheadAttention
    assert type(model["custom"]) is _Custom and type(model["custom"].self_attn) is MultiheadAttention
    assert model.training and model["enc"].layers[0].training and not model["enc"].layers[1].training
    assert not model["enc"].layers[1].self_attn.training
    _close(run(model), want, "outputs after convert")


def test_convert_threads_backend_to_the_api(monkeypatch):
    attn_calls = _spy(monkeypatch, "scaled_dot_product_attention")
    ffn_calls = _spy(monkeypatch, "feed_forward")
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, 0.0), 2, enable_nested_tensor=False)
    convert(enc, backend="reference")
    enc(torch.randn(S, N, D_MODEL))
    assert [kw["backend"] for _, kw in attn_calls] == ["reference"] * 2
    assert [kw["backend"] for _, kw in ffn_calls] == ["reference"] * 2


def test_forced_backend_that_cannot_serve_raises():
    if "cuda" in fastattn.available_backends():
        pytest.skip("cuda backend is available here; the refusal case needs a machine without it")
    mha = MultiheadAttention(E, H, backend="cuda")
    x = torch.randn(L, N, E)
    with pytest.raises(Exception, match="cuda"):
        mha(x, x, x, need_weights=False)


def test_encoder_layer_mismatched_mask_kinds_warn_like_torch():
    ours, theirs = _layer_pair({})
    x = torch.randn(S, N, D_MODEL, dtype=DT)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    mask = torch.zeros(S, S, dtype=DT)
    for layer in (theirs, ours):
        with pytest.warns(UserWarning, match="mismatched src_key_padding_mask and src_mask"):
            layer(x, src_mask=mask, src_key_padding_mask=kpm)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_encoder_layer_under_cpu_autocast(monkeypatch, backend):
    """Under autocast the feed-forward runs in the autocast dtype, like torch's nn.Linear layers."""
    if backend not in fastattn.available_backends():
        pytest.skip(f"backend {backend!r} is not available here: {fastattn.backend_status()[backend]}")
    theirs = nn.TransformerEncoderLayer(16, 2, 32, 0.0)
    _randomize(theirs)
    ours = convert(copy.deepcopy(theirs), backend=backend)
    calls = _spy(monkeypatch, "feed_forward")
    direct = _spy_direct(monkeypatch, "_ffn_fwd")  # the "cpu" backend's call from the module itself
    monkeypatch.setattr(fastattn.modules, "_ffn_small", lambda tokens, d_model, d_ff=0: False)  # the fused op, always
    x = torch.randn(6, 3, 16)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = theirs(x, src_key_padding_mask=kpm)
        got = ours(x, src_key_padding_mask=kpm)
    assert got.dtype == want.dtype
    assert [args[0].dtype for args, _ in calls] + [args[0].dtype for args in direct] == [torch.bfloat16]
    assert len(direct) == (backend == "cpu")
    _close(got.float(), want.float(), f"autocast bf16, {backend}", atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("shape", [(L, S), (N * H, L, S)])
def test_mha_float_attn_mask_gets_gradient_like_torch(shape):
    ours, theirs = _mha_pair({})
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(L, N, E, generator=gen, dtype=DT)
    k = torch.randn(S, N, E, generator=gen, dtype=DT)
    mask_t = torch.randn(shape, generator=gen, dtype=DT, requires_grad=True)
    mask_o = mask_t.detach().clone().requires_grad_()
    theirs(q, k, k, attn_mask=mask_t, need_weights=False)[0].sum().backward()
    ours(q, k, k, attn_mask=mask_o, need_weights=False)[0].sum().backward()
    _close(mask_o.grad, mask_t.grad, f"grad of a float attn_mask {shape}")


def test_encoder_padding_mask_reaches_kernels_as_key_padding_mask(monkeypatch):
    """nn.TransformerEncoder turns a bool padding mask into float 0/-inf before its layers; the converted
    layer turns it back, so kernels get key_padding_mask (and skip padded key blocks), not an additive mask."""
    import fastattn.attention as api

    seen = []
    real = api.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask"), kwargs.get("key_padding_mask")))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "scaled_dot_product_attention", spy)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0), 2, enable_nested_tensor=False)
    enc = fastattn.convert(enc.eval(), backend="reference")
    src = torch.randn(7, 3, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    enc(src, src_key_padding_mask=pad)
    assert len(seen) == 2
    for attn_mask, kpm in seen:
        assert attn_mask is None and kpm is not None and kpm.dtype == torch.bool
        assert torch.equal(kpm, pad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_layer_submodule_hooks_still_fire(backend):
    """The layer calls torch's LayerNorm / Dropout functions directly only where no hook would notice."""
    ours, theirs = _layer_pair({}, backend=backend)
    ours.eval()
    theirs.eval()
    seen = []
    ours.norm1.register_forward_hook(lambda mod, args, out: seen.append("norm1"))
    ours.dropout1.register_forward_hook(lambda mod, args, out: seen.append("dropout1"))
    x = torch.randn(S, N, D_MODEL, dtype=DT)
    _close(ours(x), theirs(x), "hooked layer")
    assert seen == ["dropout1", "norm1"]


def test_onednn_linear_double_backward(monkeypatch):
    """_OneDnnLinearFn under create_graph: the input gradient is torch's mm (differentiable), so a second
    backward through it matches F.linear's, and without create_graph it is oneDNN's."""
    import fastattn.modules as modules
    if not modules._ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    calls = _spy_onednn_linear(monkeypatch, modules)
    gen = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(s, generator=gen) for s in ((6, 16), (8, 16), (8,)))
    grads = []
    for use in (True, False):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        out = modules._linear(xs, ws, bs) if use else F.linear(xs, ws, bs)
        gx, = torch.autograd.grad((out ** 2).sum(), xs, create_graph=True)
        grads.append(torch.autograd.grad(gx.pow(2).sum(), (xs, ws, bs)))
    # the forward, then no call in the create_graph backward (torch's mm), then the input gradient of the
    # second backward (through the linear again, without create_graph) on oneDNN
    assert [tuple(c) for c in calls] == [(8, 16), (16, 8)], calls
    for a, c, name in zip(*grads, ("x", "w", "b")):
        _close(a, c, f"double backward through the oneDNN linear: {name}", atol=1e-4, rtol=1e-4)
