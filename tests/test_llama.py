"""deepen.llama equals transformers: component by component, whole models of three families, and SmolLM2."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama import modeling_llama as hf_llama

from deepen.llama import MLP, PRESETS, Attention, Block, Config, Llama, RMSNorm, apply_rope, rope

# small for testing efficiency
SMALL = Config(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, max_seq_len=64)
VARIANTS = {
    "llama": SMALL,
    "llama-tied": SMALL.replace(tie_embeddings=True, rope_theta=100000.0),
    "llama-mha-head_dim": SMALL.replace(n_kv_heads=4, head_dim=24),
    "mistral-window": SMALL.replace(sliding_window=5),  # shorter than the test sequences: the window matters
    "qwen2-bias": SMALL.replace(attention_bias=True, n_kv_heads=1),
}


def random_hf(config: Config, dtype=torch.float32):
    """A transformers model of `config` with random weights, biases non-zero."""
    torch.manual_seed(0)
    hf_config = config.to_hf()
    # from_config(dtype=...) like from_pretrained keeps the rotary inv_freq in fp32; `.to(bfloat16)` would round it
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.normal_(std=0.5 if name.endswith("bias") else 1.0)  # default biases 0, norms 1: make them count
    return model


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant):
    hf = random_hf(VARIANTS[variant])
    family = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}
    assert type(hf) is family[variant.split("-")[0]]
    ours = Llama.from_hf(hf)
    ids = torch.randint(0, SMALL.vocab_size, (2, 17))
    with torch.no_grad():
        assert max_diff(ours(ids), hf(ids).logits) <= 1e-5


def test_qwen2_biases_are_loaded_and_used():
    hf = random_hf(VARIANTS["qwen2-bias"])
    ours = Llama.from_hf(hf)
    assert torch.equal(ours.blocks[1].attn.k_proj.bias, hf.model.layers[1].self_attn.k_proj.bias)
    ids = torch.randint(0, SMALL.vocab_size, (1, 9))
    with torch.no_grad():
        before = ours(ids)
        ours.blocks[0].attn.q_proj.bias.zero_()
        assert max_diff(before, ours(ids)) > 1e-3


def test_mistral_window_changes_long_sequences_only():
    hf = random_hf(VARIANTS["mistral-window"])
    windowed = Llama.from_hf(hf)
    full = Llama(windowed.config.replace(sliding_window=None))
    full.load_state_dict(windowed.state_dict())
    ids = torch.randint(0, SMALL.vocab_size, (1, 12))
    with torch.no_grad():
        a, b = windowed(ids), full(ids)
    assert torch.equal(a[:, :5], b[:, :5])  # the first 5 positions see the same tokens either way
    assert max_diff(a[:, 5:], b[:, 5:]) > 1e-3


def test_bf16_model_stays_bf16_and_matches():
    hf = random_hf(SMALL, torch.bfloat16)
    ours = Llama.from_hf(hf)
    assert ours.embed.weight.dtype == torch.bfloat16
    ids = torch.randint(0, SMALL.vocab_size, (1, 11))
    with torch.no_grad():
        mine, theirs = ours(ids), hf(ids).logits
    assert mine.dtype == torch.bfloat16
    torch.testing.assert_close(mine, theirs)


def test_from_hf_copies_and_ties():
    hf = random_hf(VARIANTS["llama-tied"])
    ours = Llama.from_hf(hf)
    assert ours.head.weight is ours.embed.weight
    with torch.no_grad():
        ours.embed.weight.zero_()
    assert hf.model.embed_tokens.weight.abs().sum() > 0
    assert sum(p.numel() for p in ours.parameters()) == hf.num_parameters()


def test_chunked_prefill_with_cache_equals_one_pass():
    ours = Llama.from_hf(random_hf(VARIANTS["mistral-window"]))
    ids = torch.randint(0, SMALL.vocab_size, (2, 14))
    cache = ours.new_cache(2, 14)
    with torch.no_grad():
        whole = ours(ids)
        parts = torch.cat([ours(ids[:, :6], cache), ours(ids[:, 6:9], cache), ours(ids[:, 9:], cache)], dim=1)
    assert cache[0].len == 14
    assert max_diff(parts, whole) <= 1e-5


@pytest.mark.parametrize("variant", ["llama", "mistral-window", "qwen2-bias"])
def test_greedy_generation_matches_transformers(variant):
    hf = random_hf(VARIANTS[variant])
    hf.generation_config.eos_token_id = None  # a random model may emit token 2; run all 12 steps
    hf.generation_config.pad_token_id = 0
    ids = torch.randint(0, SMALL.vocab_size, (1, 4))
    expected = hf.generate(ids, do_sample=False, max_new_tokens=12)
    assert expected.shape == (1, 16)
    assert torch.equal(Llama.from_hf(hf).generate(ids, 12), expected)


# ---- components against their transformers counterparts ----

def test_rmsnorm_matches_llama_rmsnorm():
    ours, theirs = RMSNorm(64, eps=1e-5), hf_llama.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 64) * 7 + 2
    assert torch.equal(ours(x), theirs(x))
    y = ours(x)
    assert torch.allclose((y / ours.weight).pow(2).mean(-1), torch.ones(3, 5), atol=1e-4)  # unit RMS
    ours, theirs, x = ours.bfloat16(), theirs.bfloat16(), x.bfloat16()  # statistics in fp32, result in bf16
    assert ours(x).dtype == torch.bfloat16
    assert torch.equal(ours(x), theirs(x))


def test_rope_matches_transformers():
    hf_config = SMALL.replace(rope_theta=500.0).to_hf()
    positions = torch.arange(3, 20)
    q, k = torch.randn(2, 4, 17, 16), torch.randn(2, 2, 17, 16)
    cos, sin = rope(positions, 16, 500.0)
    hf_cos, hf_sin = hf_llama.LlamaRotaryEmbedding(hf_config)(q, positions[None])
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
    hf_q, hf_k = hf_llama.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    assert torch.equal(apply_rope(q, cos, sin), hf_q) and torch.equal(apply_rope(k, cos, sin), hf_k)


def test_rope_score_depends_on_relative_position_only():
    q, k = torch.randn(16), torch.randn(16)
    cos, sin = rope(torch.arange(40), 16, 10000.0)

    def score(m, n):
        return (apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])).item()

    assert score(7, 3) == pytest.approx(score(37, 33), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def _layer_pair(cls_ours, make_hf):
    torch.manual_seed(1)
    hf_config = SMALL.to_hf()
    hf_config._attn_implementation = "sdpa"  # what LlamaForCausalLM sets; a bare module would get none
    theirs = make_hf(hf_config)
    ours = cls_ours(SMALL)
    ours.load_state_dict({k.replace("self_attn.", "attn.").replace("input_layernorm", "attn_norm")
                          .replace("post_attention_layernorm", "mlp_norm"): v for k, v in theirs.state_dict().items()})
    return ours, theirs


def test_mlp_matches_llama_mlp():
    ours, theirs = _layer_pair(MLP, hf_llama.LlamaMLP)
    x = torch.randn(2, 7, SMALL.dim)
    assert torch.equal(ours(x), theirs(x))


def test_attention_and_block_match_transformers():
    x = torch.randn(2, 9, SMALL.dim)
    cos, sin = rope(torch.arange(9), SMALL.head_dim, SMALL.rope_theta)
    ours, theirs = _layer_pair(Attention, lambda c: hf_llama.LlamaAttention(c, layer_idx=0))
    theirs_out = theirs(x, position_embeddings=(cos[None], sin[None]), attention_mask=None)[0]
    assert max_diff(ours(x, cos, sin), theirs_out) <= 1e-6
    ours, theirs = _layer_pair(Block, lambda c: hf_llama.LlamaDecoderLayer(c, layer_idx=0))
    with torch.no_grad():
        ours.attn_norm.weight.normal_()
        theirs.input_layernorm.weight.copy_(ours.attn_norm.weight)
    assert max_diff(ours(x, cos, sin), theirs(x, position_embeddings=(cos[None], sin[None]))) <= 1e-6


# ---- configs ----

@pytest.mark.parametrize("name", PRESETS)
def test_config_round_trip(name):
    config = PRESETS[name]
    assert Config.from_hf(config.to_hf()) == config


def test_replace_keeps_head_dim_derived():
    assert PRESETS["toy"].replace(dim=512).head_dim == 128
    assert PRESETS["toy"].replace(n_heads=8, n_kv_heads=8).head_dim == 32
    assert SMALL.replace(head_dim=24).replace(dim=128).head_dim == 24  # an explicit head_dim stays
    assert PRESETS["toy"].replace(n_layers=2).head_dim == 64


def test_parameter_counts_on_meta_device():
    with torch.device("meta"):
        llama2, mistral = Llama(PRESETS["llama2-7b"]), Llama(PRESETS["mistral-7b"])
    assert sum(p.numel() for p in llama2.parameters()) == 6_738_415_616
    assert sum(p.numel() for p in llama2.blocks[0].parameters()) == 202_383_360
    assert sum(p.numel() for p in mistral.blocks[0].parameters()) == 218_112_000
    assert 1e6 <= sum(p.numel() for p in Llama(PRESETS["toy"]).parameters()) <= 10e6


def test_unsupported_models_are_refused_clearly():
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="model_type 'qwen3' is not supported"):
        Llama.from_hf(qwen3)
    llama3_rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    llama3_rope = SMALL.to_hf().to_dict() | {"rope_parameters": llama3_rope}
    with pytest.raises(ValueError, match="rope_type='llama3'"):
        Config.from_hf(LlamaConfig(**llama3_rope))
    with pytest.raises(ValueError, match="o_proj bias"):
        Config.from_hf(LlamaConfig(**SMALL.to_hf().to_dict() | {"attention_bias": True}))
    with pytest.raises(ValueError, match="does not have the Llama layout"):
        Llama.from_hf(LlamaModel(SMALL.to_hf()))  # the decoder without its LM head
    with pytest.raises(ValueError, match="n_kv_heads from"):
        Config(n_heads=6, n_kv_heads=4)


# ---- the real SmolLM2-135M ----

def test_smollm2_logits_match(smollm2_model, smollm2_tokenizer):
    assert Config.from_hf(smollm2_model.config) == PRESETS["smol"].replace(norm_eps=smollm2_model.config.rms_norm_eps)
    ours = Llama.from_hf(smollm2_model)
    ids = smollm2_tokenizer("The quick brown fox jumps over the lazy dog, and the dog does not mind.",
                            return_tensors="pt").input_ids
    with torch.no_grad():
        assert max_diff(ours(ids), smollm2_model(ids).logits) <= 1e-5


def test_smollm2_greedy_generation_matches(smollm2_model, smollm2_tokenizer):
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = smollm2_model.generate(ids, do_sample=False, max_new_tokens=20)
    mine = Llama.from_hf(smollm2_model).generate(ids, 20)
    assert expected.shape[1] > ids.shape[1] + 5
    assert torch.equal(mine[:, : expected.shape[1]], expected)  # transformers stops early at end-of-sequence
    assert "Paris" in smollm2_tokenizer.decode(mine[0, ids.shape[1]:])
