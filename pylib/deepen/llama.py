"""The Llama decoder from scratch, dense like meta-llama's model.py, numerically equal to transformers'.

One block (Touvron et al. 2023, arXiv 2302.13971; Llama 2, arXiv 2307.09288):

    h   = x + Attn(RMSNorm(x))         grouped-query attention with rotary positions
    out = h + SwiGLU(RMSNorm(h))

`Llama.from_hf(model)` loads the weights of any Hugging Face model with exactly that layout
(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM); `Config.to_hf()` goes the other way for configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FROM_HF_TYPES = ("llama", "mistral", "qwen2")  # HF model_type values whose blocks are exactly the block above


@dataclass
class Config:
    vocab_size: int = 4096
    dim: int = 256  # hidden_size in transformers
    n_layers: int = 8
    n_heads: int = 4
    n_kv_heads: int = 2  # < n_heads: grouped-query attention; == n_heads: multi-head attention
    intermediate_size: int = 688  # SwiGLU width, about 8/3 · dim
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 1024
    tie_embeddings: bool = False  # the output head reuses the token embedding matrix
    attention_bias: bool = False  # biases on q, k, v (Qwen2); o_proj never has one here
    head_dim: int | None = None  # None: dim // n_heads
    sliding_window: int | None = None  # Mistral-7B v0.1: each token sees the last 4096 positions

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                             f"pick n_kv_heads from {[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]}")

    @property
    def hidden_size(self) -> int:
        return self.dim

    def replace(self, **changes) -> Config:
        """A copy with some fields changed, e.g. `PRESETS["toy"].replace(n_layers=2)`.
        A head_dim that was dim // n_heads follows new dim or n_heads unless given."""
        if {"dim", "n_heads"} & changes.keys() and self.head_dim == self.dim // self.n_heads:
            changes.setdefault("head_dim", None)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf_config) -> Config:
        """Read a transformers config; raise if the model computes anything our block does not."""
        c = hf_config
        if c.model_type not in FROM_HF_TYPES:
            raise ValueError(
                f"model_type {c.model_type!r} is not supported: deepen.llama implements the plain Llama block "
                f"(RMSNorm → attention → RMSNorm → SwiGLU) found in {', '.join(FROM_HF_TYPES)}. "
                "Models with q/k norms, extra norms or other changes (e.g. qwen3, gemma, olmo2) compute something "
                "else; use the transformers model for those."
            )
        rope = getattr(c, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        layer_types = set(getattr(c, "layer_types", None) or [])  # Qwen2 lists each layer's attention kind
        problems = [
            f"hidden_act={c.hidden_act!r} (needs 'silu')" if c.hidden_act != "silu" else "",
            "mlp_bias=True" if getattr(c, "mlp_bias", False) else "",
            f"rope_type={rope_type!r} (needs 'default')" if rope_type != "default" else "",
            "attention_bias=True on Llama (o_proj bias)" if c.model_type == "llama" and c.attention_bias else "",
            "a mix of sliding-window and full-attention layers" if len(layer_types) > 1 else "",
        ]
        if any(problems):
            raise ValueError(f"{c.model_type} config with {', '.join(p for p in problems if p)} is not supported "
                             "by deepen.llama; use the transformers model")
        return cls(
            vocab_size=c.vocab_size,
            dim=c.hidden_size,
            n_layers=c.num_hidden_layers,
            n_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
            intermediate_size=c.intermediate_size,
            rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
            norm_eps=c.rms_norm_eps,
            max_seq_len=c.max_position_embeddings,
            tie_embeddings=bool(c.tie_word_embeddings),
            attention_bias=c.model_type == "qwen2",
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            sliding_window=getattr(c, "sliding_window", None) if layer_types <= {"sliding_attention"} else None,
        )

    def to_hf(self):
        """The transformers config of the same model: LlamaConfig; MistralConfig with a sliding window;
        Qwen2Config with q/k/v biases."""
        from transformers import LlamaConfig, MistralConfig, Qwen2Config

        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            intermediate_size=self.intermediate_size,
            head_dim=self.head_dim,
            rms_norm_eps=self.norm_eps,
            max_position_embeddings=self.max_seq_len,
            tie_word_embeddings=self.tie_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        if self.attention_bias:
            return Qwen2Config(**common, use_sliding_window=self.sliding_window is not None,
                               sliding_window=self.sliding_window, max_window_layers=0)
        if self.sliding_window is not None:
            return MistralConfig(**common, sliding_window=self.sliding_window)
        return LlamaConfig(**common)


PRESETS = {
    # small for testing efficiency: ~6.9M parameters
    "toy": Config(vocab_size=4096, dim=256, n_layers=8, n_heads=4, n_kv_heads=2, intermediate_size=688,
                  rope_theta=10000.0, max_seq_len=1024, tie_embeddings=True),
    # HuggingFaceTB/SmolLM2-135M(-Instruct)
    "smol": Config(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                   rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": Config(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008,
                        rope_theta=10000.0, max_seq_len=4096),
    # mistralai/Mistral-7B-v0.1 (the base of SOLAR-10.7B)
    "mistral-7b": Config(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                         rope_theta=10000.0, max_seq_len=32768, sliding_window=4096),
}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g — no mean subtraction, no bias (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # computed in fp32, cast back, as Meta and transformers do
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32):
    """cos, sin of the angles m·θ_i, θ_i = theta^(-2i/d) (Su et al. 2021, arXiv 2104.09864), each (seq, head_dim).

    The layout is transformers': the angle for pair i sits at columns i and i + d/2 (halves, not interleaved).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    angles = positions[:, None].float() * inv_freq  # (seq, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (seq, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) at position m by the angle m·θ_i. x: (batch, heads, seq, head_dim)."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of one attention layer for the tokens seen so far, preallocated to max_len."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.empty(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.len = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append (batch, kv_heads, seq, head_dim) keys/values; return all so far."""
        end = self.len + k.shape[2]
        self.k[:, :, self.len:end], self.v[:, :, self.len:end] = k, v
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_mask(n_queries: int, n_keys: int, window: int | None, device=None) -> torch.Tensor:
    """(queries, keys) bool, True = may attend; the queries are the last n_queries positions."""
    i = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    j = torch.arange(n_keys, device=device)[None, :]
    return (j <= i) & (i - j < (window or n_keys))


class Attention(nn.Module):
    """softmax(q·kᵀ/√d + causal) v, with n_kv_heads k/v heads each shared by n_heads/n_kv_heads query heads."""

    def __init__(self, c: Config):
        super().__init__()
        self.head_dim, self.window = c.head_dim, c.sliding_window
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (batch, heads, seq, head_dim)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (batch, kv_heads, seq, head_dim)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (batch, kv_heads, seq, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (batch, kv_heads, cached + seq, head_dim)
        n_keys = k.shape[2]
        # the fast path (is_causal) covers a fresh sequence or one new token, both within the window
        mask = None
        if (seq > 1 and seq != n_keys) or (self.window and n_keys > self.window):
            mask = causal_mask(seq, n_keys, self.window, x.device)
        # enable_gqa: query head h reads k/v head h // (heads/kv_heads) — repeating k/v, without the copy
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                             enable_gqa=True)  # (batch, heads, seq, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020, arXiv 2002.05202): down(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.dim, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.dim, c.norm_eps), Attention(c)
        self.mlp_norm, self.mlp = RMSNorm(c.dim, c.norm_eps), MLP(c)

    def forward(self, x, cos, sin, cache: KVCache | None = None):  # x: (batch, seq, dim)
        h = x + self.attn(self.attn_norm(x), cos, sin, cache)  # h = x + Attn(RMSNorm(x))
        return h + self.mlp(self.mlp_norm(h))  # out = h + SwiGLU(RMSNorm(h))


# transformers' parameter names → ours (the only renaming; projections keep their HF names)
_HF_NAMES = {
    "model.embed_tokens.": "embed.",
    "model.layers.": "blocks.",
    ".input_layernorm.": ".attn_norm.",
    ".self_attn.": ".attn.",
    ".post_attention_layernorm.": ".mlp_norm.",
    "model.norm.": "norm.",
    "lm_head.": "head.",
}


class Llama(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(_init)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        """input_ids (batch, seq) → logits (batch, seq, vocab). With a cache, positions continue after it."""
        start = cache[0].len if cache else 0
        x = self.embed(input_ids)  # (batch, seq, dim)
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta, x.dtype)  # (seq, head_dim)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache[i] if cache else None)
        return self.head(self.norm(x))

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        c, w = self.config, self.embed.weight
        return [KVCache(batch, c.n_kv_heads, max_len, c.head_dim, w.dtype, w.device) for _ in self.blocks]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a KV cache: the prompt once, then one token per step. Returns prompt + new tokens."""
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        new = input_ids
        for _ in range(max_new_tokens):
            new = self(new, cache)[:, -1:].argmax(-1)  # (batch, 1)
            input_ids = torch.cat([input_ids, new], dim=1)
        return input_ids

    @classmethod
    def from_hf(cls, hf_model) -> Llama:
        """Copy the weights of a transformers Llama-family causal LM (same dtype and device)."""
        config = Config.from_hf(hf_model.config)
        with torch.device("meta"):
            model = cls(config)
        state = {}
        for name, tensor in hf_model.state_dict().items():
            for hf, ours in _HF_NAMES.items():
                name = name.replace(hf, ours)
            state[name] = tensor.detach().clone()
        if config.tie_embeddings:
            state.pop("head.weight", None)
        expected = set(model.state_dict()) - ({"head.weight"} if config.tie_embeddings else set())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{type(hf_model).__name__} does not have the Llama layout: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_embeddings:
            model.head.weight = model.embed.weight
        return model.train(hf_model.training)


def _init(module: nn.Module) -> None:
    """transformers' initialisation: normal(0, 0.02) weights, zero biases (RMSNorm weights stay 1)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
