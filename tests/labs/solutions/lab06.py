"""Reference solutions of notebooks/labs/lab06_budget_by_hand.ipynb: each `# %% name` section replaces the exercise
cell of that name (`deepen grade --fill-from`)."""

# %% param_count


def param_count(vocab, hidden, layers, intermediate, heads, kv_heads, tied):
    kv = hidden // heads * kv_heads  # the width of k_proj and v_proj
    attention = 2 * hidden * hidden + 2 * hidden * kv  # q_proj, o_proj; k_proj, v_proj
    mlp = 3 * hidden * intermediate  # gate_proj, up_proj, down_proj
    block = attention + mlp + 2 * hidden  # and two RMSNorm weights
    head = 0 if tied else vocab * hidden
    return vocab * hidden + layers * block + hidden + head  # embeddings, blocks, final norm, head


# %% train_flops


def train_flops(matmul, trainable):
    total, backward = 0, False
    for params, learns in zip(matmul, trainable):
        backward = backward or learns  # from the first trainable stage up, the gradient passes through
        total += 2 * params  # forward
        if backward:
            total += 2 * params  # gradient with respect to the stage's input
        if learns:
            total += 2 * params  # gradient with respect to its weights
    return total


# %% state_memory


def state_memory(trainable, gpus):
    per_parameter = 4 + 4 + 8  # fp32 weight, fp32 gradient, AdamW's two fp32 moments
    return per_parameter * trainable / gpus / 1e9
