"""Reference solutions of notebooks/labs/lab01_llama_block.ipynb: each `# %% name` section replaces the exercise cell
of that name (`deepen grade --fill-from`). The preamble above the first section holds the lab's imports, so this
file also runs as a module."""

import math

import torch
import torch.nn.functional as F

from deepen import llama

# %% rmsnorm
def rms_norm(x, weight, eps):
    # x / sqrt(mean(x²) + eps) · g, computed in fp32 and cast back
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# %% rope
def apply_rope(x, positions, theta):
    # x: (batch, heads, seq, head_dim); pair i = (x[i], x[i + d/2]) at position m turns by m · theta^(-2i/d)
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2).float() / d)  # (d/2,)
    angle = positions[:, None].float() * inv_freq  # (seq, d/2)
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


# %% attention
def attention(x, attn, cos, sin, n_heads, n_kv_heads):
    batch, seq, _ = x.shape
    q = attn.q_proj(x).view(batch, seq, n_heads, -1).transpose(1, 2)  # (batch, heads, seq, head_dim)
    k = attn.k_proj(x).view(batch, seq, n_kv_heads, -1).transpose(1, 2)  # (batch, kv_heads, seq, head_dim)
    v = attn.v_proj(x).view(batch, seq, n_kv_heads, -1).transpose(1, 2)
    q, k = llama.apply_rope(q, cos, sin), llama.apply_rope(k, cos, sin)
    k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)  # query head h reads k/v head h // group
    v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)  # (batch, heads, seq, head_dim)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (batch, heads, seq, seq)
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)  # key j > query i
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return attn.o_proj((weights @ v).transpose(1, 2).reshape(batch, seq, -1))


# %% swiglu
def swiglu(x, mlp):
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


# %% block
def block(x, b, cos, sin):
    h = x + b.attn(b.attn_norm(x), cos, sin)  # h = x + Attn(RMSNorm(x))
    return h + b.mlp(b.mlp_norm(h))  # out = h + SwiGLU(RMSNorm(h))
