"""Reference solutions of notebooks/labs/lab10_capstone_smollm2.ipynb: each `# %% name` section replaces the
exercise cell of that name (`deepen grade --fill-from`)."""

# %% capstone
import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x, positions, theta):
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(0, half, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (seq, half)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def logits(state, config, input_ids):
    h = state["model.embed_tokens.weight"][input_ids]  # (batch, seq, hidden)
    batch, seq, hidden = h.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim, eps = hidden // heads, config.rms_norm_eps
    theta = config.rope_parameters["rope_theta"]
    positions = torch.arange(seq)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(config.num_hidden_layers):
        w = {k.removeprefix(f"model.layers.{i}."): v for k, v in state.items() if k.startswith(f"model.layers.{i}.")}
        x = rms_norm(h, w["input_layernorm.weight"], eps)
        q = (x @ w["self_attn.q_proj.weight"].T).view(batch, seq, heads, head_dim).transpose(1, 2)
        k = (x @ w["self_attn.k_proj.weight"].T).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = (x @ w["self_attn.v_proj.weight"].T).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        q, k = rotate(q, positions, theta), rotate(k, positions, theta)
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / head_dim ** 0.5
        attention = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # (batch, heads, seq, head_dim)
        h = h + attention.transpose(1, 2).reshape(batch, seq, hidden) @ w["self_attn.o_proj.weight"].T
        x = rms_norm(h, w["post_attention_layernorm.weight"], eps)
        gate, up = x @ w["mlp.gate_proj.weight"].T, x @ w["mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])  # tied: the embeddings
    return rms_norm(h, state["model.norm.weight"], eps) @ head.T
