"""A small Llama-shaped model through Hugging Face transformers on the CPU (fp32): 4 layers,
d_model 512, 8 query heads over 2 kv heads (GQA), head dim 64, MLP 1408, vocab 2048, random weights
from a config (no download). attn_implementation "fastattn" (fastattn.integrations.transformers)
against transformers' "sdpa" (the baseline: torch's SDPA) and "eager" (matmul-softmax-matmul):

- prefill: forward of (N 4, L 256) tokens with left padding on one row, eval, no_grad;
- train step: forward, cross-entropy loss, backward, AdamW step on (N 4, L 256);
- generate: greedy generation of 32 new tokens after a 64-token prompt (N 1) with the KV cache;
  extra_info["tokens_per_s"] is new tokens per second.

Before timing, each implementation's logits (and generated tokens) are checked against "sdpa".
"""
from __future__ import annotations

import copy

import pytest
import torch

import common
from common import Case

transformers = pytest.importorskip("transformers")

FP32 = torch.float32
LAYERS, D_MODEL, HEADS, KV_HEADS, MLP, VOCAB = 4, 512, 8, 2, 1408, 2048
N, L = 4, 256
PROMPT, NEW_TOKENS = 64, 32
MODEL_SHAPE = (("layers", LAYERS), ("D", D_MODEL), ("H", HEADS), ("Hkv", KV_HEADS))

CASES = [
    Case("cpu", "llama", "prefill", FP32, (("N", N), ("L", L)) + MODEL_SHAPE, variant="leftpad"),
    Case("cpu", "llama", "train", FP32, (("N", N), ("L", L)) + MODEL_SHAPE),
    Case("cpu", "llama", "generate", FP32, (("N", 1), ("L", PROMPT), ("new", NEW_TOKENS)) + MODEL_SHAPE),
]
IMPLS = ("fastattn", "sdpa", "eager")
BASELINE = "transformers[sdpa]"


def _method(impl: str) -> str:
    return f"transformers[{impl}]"


def _params():
    ps = []
    for case in CASES:
        for impl in IMPLS:
            if impl == "fastattn" and common.fastattn_module() is None:
                continue
            ps.append(pytest.param(case, impl, id=f"{case.id}::{_method(impl)}"))
    return ps


_MODELS = common.LastCase()


def _model(impl: str):
    def make():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=MLP,
                                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          num_key_value_heads=KV_HEADS, max_position_embeddings=1024,
                                          pad_token_id=0)
        return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")

    base = _MODELS.get("llama", make)
    model = copy.deepcopy(base)
    if impl == "fastattn":
        from fastattn.integrations.transformers import register

        register()
    model.set_attn_implementation(impl)
    return model


def _tokens(n: int, l: int, pad_left: int = 0):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, l), generator=gen)
    mask = torch.ones(n, l, dtype=torch.long)
    if pad_left:
        mask[-1, :pad_left] = 0
        ids[mask == 0] = 0
    return ids, mask


def _flops(case: Case) -> float:
    """2 x non-embedding parameters per token (x3 with the backward) plus causal attention."""
    per_token = LAYERS * (2 * D_MODEL * D_MODEL + 2 * D_MODEL * (D_MODEL // HEADS * KV_HEADS) + 3 * D_MODEL * MLP)
    per_token += D_MODEL * VOCAB
    if case.pass_ == "generate":
        s = PROMPT + NEW_TOKENS
        linear = 2.0 * per_token * (PROMPT + NEW_TOKENS)
        attn = LAYERS * common.attention_flops(1, HEADS, s, s, D_MODEL // HEADS, causal=True)
        return linear + attn
    tokens = case["N"] * case["L"]
    linear = 2.0 * per_token * tokens * (3 if case.pass_ == "train" else 1)
    attn = LAYERS * common.attention_flops(case["N"], HEADS, case["L"], case["L"], D_MODEL // HEADS, causal=True,
                                           backward=case.pass_ == "train")
    return linear + attn


@pytest.mark.parametrize("case,impl", _params())
def test_llama(benchmark, case: Case, impl: str):
    model = _model(impl)
    ref = _model("sdpa")
    extra = {"attn_implementation": impl}
    if case.pass_ == "prefill":
        ids, mask = _tokens(case["N"], case["L"], pad_left=case["L"] // 4)
        model.eval()
        ref.eval()
        with torch.no_grad():
            keep = mask.bool()
            common.check_close(model(input_ids=ids, attention_mask=mask).logits[keep],
                               ref(input_ids=ids, attention_mask=mask).logits[keep], FP32, f"{impl} prefill")

        def fn():
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).logits
    elif case.pass_ == "train":
        ids, mask = _tokens(case["N"], case["L"])
        model.train()
        ref.train()
        common.check_close(model(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss, FP32,
                           f"{impl} train loss")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def fn():
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
    else:
        ids, mask = _tokens(case["N"], case["L"])
        model.eval()
        ref.eval()
        kw = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                  pad_token_id=0)
        got = model.generate(ids, **kw)
        assert torch.equal(got, ref.generate(ids, **kw)), f"{impl}: greedy tokens differ from sdpa's"

        def fn():
            return model.generate(ids, **kw)

    common.measure(benchmark, fn, case, _method(impl), baseline=BASELINE, flops=_flops(case), extra=extra)
    if case.pass_ == "generate" and "median_s" in benchmark.extra_info:
        benchmark.extra_info["tokens_per_s"] = case["N"] * NEW_TOKENS / benchmark.extra_info["median_s"]
