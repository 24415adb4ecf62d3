"""attn_implementation="fastattn" in Hugging Face transformers, on small random-initialised models.

Every model is built from a config (no download). Logits and gradients of "fastattn" (float32) are
checked against the float64 "sdpa" model with the bound of fastattn.testing, the float32 "sdpa"
model being torch's same-dtype peer; the profiler proves fastattn's kernels ran.
"""
import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastattn  # noqa: E402
from fastattn.integrations import transformers as fa_hf  # noqa: E402
from fastattn.testing import check_bound  # noqa: E402

NAME = fa_hf.register()


def _fastattn_ops(fn, record_shapes=False):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=record_shapes) as p:
        result = fn()
    events = [e for e in p.key_averages(group_by_input_shape=record_shapes) if e.key.startswith("fastattn::")]
    return result, events


def _llama_config(**kw):
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    cfg.update(kw)
    return transformers.LlamaConfig(**cfg)


def _models(model_cls, config):
    """(float32 "fastattn", float32 "sdpa", float64 "sdpa"): the same random weights."""
    torch.manual_seed(0)
    peer = model_cls._from_config(config, attn_implementation="sdpa")
    ours = copy.deepcopy(peer)
    ours.set_attn_implementation(NAME)
    ref = copy.deepcopy(peer).double()
    return ours, peer, ref


def _forward_and_grads(model, inputs, valid, out_attr="logits"):
    model.zero_grad(set_to_none=True)
    out = getattr(model(**inputs), out_attr)
    sel = out[valid]
    (sel.double().pow(2).mean() if sel.dtype != torch.float64 else sel.pow(2).mean()).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return sel.detach(), grads


def _check_model(model_cls, config, inputs, valid, out_attr="logits", train=False):
    ours, peer, ref = _models(model_cls, config)
    for m in (ours, peer, ref):
        m.train(train)
    ref_out, ref_grads = _forward_and_grads(ref, inputs, valid, out_attr)
    peer_out, peer_grads = _forward_and_grads(peer, inputs, valid, out_attr)
    (out, grads), events = _fastattn_ops(lambda: _forward_and_grads(ours, inputs, valid, out_attr))
    names = {e.key for e in events}
    assert {"fastattn::attention_fwd", "fastattn::attention_bwd"} <= names, names
    check_bound(f"{model_cls.__name__} {out_attr}", out, peer_out, ref_out)
    check_bound(f"{model_cls.__name__} parameter grads", grads, peer_grads, ref_grads)
    return ours, peer


def _padded(batch, length, vocab, pad_left=(), pad_right=()):
    ids = torch.randint(1, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, n in pad_left:
        mask[row, :n] = 0
    for row, n in pad_right:
        mask[row, length - n:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("padding", ["left", "right"])
def test_llama_gqa_causal_padding_logits_and_grads(padding):
    config = _llama_config()
    ids, mask = _padded(3, 11, 96, **({"pad_left": [(1, 4), (2, 1)]} if padding == "left" else
                                      {"pad_right": [(0, 3), (2, 5)]}))
    _check_model(transformers.LlamaForCausalLM, config, dict(input_ids=ids, attention_mask=mask), mask.bool())


def test_llama_gqa_runs_without_repeat_kv_copies():
    config = _llama_config()
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=NAME).eval()
    ids = torch.randint(1, 96, (2, 9))
    _, events = _fastattn_ops(lambda: model(input_ids=ids), record_shapes=True)
    shapes = {str(e.input_shapes[:3]) for e in events if e.key == "fastattn::attention_fwd"}
    assert shapes == {str([[2, 4, 9, 16], [2, 2, 9, 16], [2, 2, 9, 16]])}, shapes  # k, v keep 2 kv heads


def test_llama_training_step_matches_sdpa():
    config = _llama_config()
    ids, mask = _padded(2, 10, 96, pad_left=[(1, 3)])
    labels = ids.masked_fill(mask == 0, -100)
    ours, peer, ref = _models(transformers.LlamaForCausalLM, config)
    params = {}
    for tag, model in (("ours", ours), ("peer", peer), ("ref", ref)):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        params[tag] = (loss.detach(), torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    check_bound("training loss", params["ours"][0], params["peer"][0], params["ref"][0])
    check_bound("parameters after one step", params["ours"][1], params["peer"][1], params["ref"][1])


def test_llama_attention_dropout_in_training_uses_torchs_generator():
    config = _llama_config(attention_dropout=0.3)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=NAME)
    ids = torch.randint(1, 96, (2, 8))
    model.train()
    torch.manual_seed(5)
    a = model(input_ids=ids).logits
    torch.manual_seed(5)
    b = model(input_ids=ids).logits
    torch.manual_seed(6)
    c = model(input_ids=ids).logits
    model.eval()
    d = model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, d)


def test_llama_greedy_generate_identical_to_sdpa_with_left_padding():
    config = _llama_config()
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    ids, mask = _padded(3, 7, 96, pad_left=[(0, 2), (2, 4)])
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kw)
    model.set_attn_implementation(NAME)
    got, events = _fastattn_ops(lambda: model.generate(ids, **kw))
    assert torch.equal(got, want)
    assert events and events[0].count >= 2 * 10  # prefill and each decode step, every layer


def test_from_pretrained_from_config_and_set_attn_implementation(tmp_path):
    config = _llama_config()
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)
    assert loaded.config._attn_implementation == NAME
    built = transformers.LlamaForCausalLM._from_config(config, attn_implementation=NAME)
    assert built.config._attn_implementation == NAME
    ids = torch.randint(1, 96, (1, 6))
    for m in (loaded, built):
        _, events = _fastattn_ops(lambda: m(input_ids=ids))
        assert {e.key for e in events} == {"fastattn::attention_fwd"}
    model.set_attn_implementation(NAME)
    assert model.config._attn_implementation == NAME


def test_bert_bidirectional_with_padding():
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask = _padded(3, 10, 96, pad_right=[(0, 4), (2, 1)])
    _check_model(transformers.BertModel, config, dict(input_ids=ids, attention_mask=mask), mask.bool(),
                 out_attr="last_hidden_state")


def test_sliding_window_model_served_through_the_mask():
    config = transformers.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                        max_position_embeddings=64, pad_token_id=0)
    ids, mask = _padded(2, 12, 96, pad_left=[(1, 3)])
    ours, peer = _check_model(transformers.MistralForCausalLM, config, dict(input_ids=ids, attention_mask=mask),
                              mask.bool())
    # the window matters here: a model without it gives other logits
    wide = copy.deepcopy(peer).eval()
    wide.config.sliding_window = None
    ours.eval()
    assert not torch.allclose(ours(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                              wide(input_ids=ids, attention_mask=mask).logits[mask.bool()], atol=1e-3)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), peer.eval().generate(ids, **kw))


def test_sliding_layer_without_a_mask_goes_to_sdpa_once(caplog):
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    fa_hf._warned.discard("sliding_window")
    with caplog.at_level(logging.WARNING, logger=fa_hf.__name__):
        out, weights = fa_hf.attention_forward(module, q, k, v, None, sliding_window=3)
        fa_hf.attention_forward(module, q, k, v, None, sliding_window=3)
    assert weights is None and out.shape == (1, 8, 4, 16)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(out, want.transpose(1, 2))  # what transformers' "sdpa" gives (no window without a mask)
    assert sum("sliding-window" in r.message for r in caplog.records) == 1
    assert not fastattn.sdpa.sdpa_enabled()


def test_softcap_is_refused_with_a_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="argument 'softcap'"):
        fa_hf.attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)


def test_sdpa_implementation_under_enable_sdpa_runs_fastattn():
    """The second way in: an unchanged attn_implementation="sdpa" model inside fastattn.enable_sdpa()."""
    config = _llama_config()
    ids, mask = _padded(2, 9, 96, pad_left=[(1, 2)])
    _, peer, ref = _models(transformers.LlamaForCausalLM, config)
    for m in (peer, ref):
        m.eval()
    want = ref(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    same = peer(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    with fastattn.enable_sdpa():
        out, events = _fastattn_ops(lambda: peer(input_ids=ids, attention_mask=mask).logits[mask.bool()])
    assert {e.key for e in events} == {"fastattn::attention_fwd"}
    check_bound("sdpa model under enable_sdpa", out, same, want)
