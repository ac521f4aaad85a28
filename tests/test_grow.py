import pytest
import torch
import transformers as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepen.grow import grow
from deepen.plan import dus, llama_pro, stack

ARCHS = {  # small for testing efficiency
    "llama": (T.LlamaConfig, T.LlamaForCausalLM),
    "mistral": (T.MistralConfig, T.MistralForCausalLM),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),  # q/k/v biases
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),  # q/k norms
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM),  # post-norms, sliding/full layer_types
}


def tiny(arch="llama", layers=4, hidden=32, heads=4, kv=2, seed=0, dtype=torch.float32, **kw):
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                        vocab_size=97, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random biases, so a bias left unzeroed would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model.to(dtype)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def generate(model, ids, n=8):
    return model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)


IDS = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(sorted(ARCHS)), layers=st.sampled_from([1, 2, 4, 6]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000), data=st.data())
def test_llama_pro_is_exactly_the_same_function(arch, layers, dtype, seed, data):
    groups = data.draw(st.sampled_from([g for g in range(1, layers + 1) if layers % g == 0]))
    copies = data.draw(st.integers(1, layers // groups))
    placement = data.draw(st.sampled_from(["interleave", "top", "bottom"]))
    base = tiny(arch, layers=layers, seed=seed, dtype=dtype)
    grown = grow(base, llama_pro(layers, groups, copies, placement))
    assert torch.equal(logits(base, IDS), logits(grown, IDS))  # max abs diff 0.0, not a tolerance
    assert torch.equal(generate(base, IDS[:1]), generate(grown, IDS[:1]))  # KV cache indices are right


def test_grow_leaves_the_original_untouched_and_renumbers():
    base = tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    grown = grow(base, llama_pro(4, 2))
    assert len(base.model.layers) == 4 and base.config.num_hidden_layers == 4
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert [b.self_attn.layer_idx for b in grown.model.layers] == list(range(6))
    assert grown.config.num_hidden_layers == 6
    assert all(b.self_attn.config is grown.config for b in grown.model.layers)
    # the copies are independent tensors, not views of the source layer
    assert grown.model.layers[2].self_attn.q_proj.weight.data_ptr() != grown.model.layers[1].self_attn.q_proj.weight.data_ptr()
    assert grown.model.layers[2].mlp.down_proj.weight.abs().sum() == 0
    assert grown.model.layers[1].mlp.down_proj.weight.abs().sum() > 0


def test_per_layer_config_follows_the_plan():
    base = tiny("gemma2")
    assert base.config.layer_types == ["sliding_attention", "full_attention"] * 2
    grown = grow(base, dus(4, 1))  # sources 0 1 2 1 2 3
    assert grown.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention",
                                        "full_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_save_and_reload_gives_the_same_function(arch, tmp_path):
    base = tiny(arch)
    grown = grow(base, dus(4, 1))
    grown.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 6
    assert torch.equal(logits(grown, IDS), logits(reloaded, IDS))
    assert torch.equal(generate(grown, IDS[:1]), generate(reloaded, IDS[:1]))


def test_function_changing_plans_change_the_function():
    base = tiny()
    for plan in (dus(4, 1), stack(4, 2)):
        assert not torch.allclose(logits(base, IDS), logits(grow(base, plan), IDS))


def test_init_ablation_options():
    base = tiny()
    plan = llama_pro(4, 2)
    zeros = grow(base, plan, init="zeros")
    assert all(p.abs().sum() == 0 for i in plan.new_layers for p in zeros.model.layers[i].parameters())
    assert torch.equal(logits(base, IDS), logits(zeros, IDS))  # all-zero block: identity too (but cannot learn)
    random = grow(base, plan, init="random")
    assert not torch.allclose(logits(base, IDS), logits(random, IDS))
    with pytest.raises(ValueError, match="init='bad' is not one of plan, copy, random, zeros, masked"):
        grow(base, plan, init="bad")


def test_refuses_moe_and_unknown_and_wrong_plan():
    moe = T.MixtralForCausalLM(T.MixtralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                               num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(NotImplementedError, match="mixture-of-experts"):
        grow(moe, llama_pro(2, 1))
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97))
    with pytest.raises(NotImplementedError, match="model_type 'gpt2' is not supported"):
        grow(gpt2, llama_pro(2, 1))
    with pytest.raises(ValueError, match="the plan is for 8 layers but the model has 4"):
        grow(tiny(), llama_pro(8, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_llama_pro_is_exact(smollm2_path, smollm2_tokenizer, dtype):
    # its own copy in `dtype`: model.to(bfloat16) would also round the shared fixture's RoPE buffer for good
    base = T.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=dtype).eval()
    grown = grow(base, llama_pro(30, groups=6))  # 30 -> 36 layers
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(logits(base, ids), logits(grown, ids))
    out = generate(grown, ids, n=6)
    assert torch.equal(generate(base, ids, n=6), out)
    if dtype == torch.float32:
        assert "Paris" in smollm2_tokenizer.decode(out[0, ids.shape[1]:])
