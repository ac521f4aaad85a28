"""Reference solutions of notebooks/labs/lab09_step0_gradients.ipynb: each `# %% name` section replaces the exercise
cell of that name (`deepen grade --fill-from`)."""

# %% gets_gradient
ATTENTION = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"]
MLP = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]


def gets_gradient(init, step):
    if init == "copy":
        return ATTENTION + MLP + NORMS  # a working block: everything learns
    if init == "zeros":
        return []  # every input or every gradient at an output is zero, at every step
    if init == "llama-pro":
        # step 0: only the zeroed matrices (gradient at their output × their nonzero input); the gradient into the
        # rest of the block passes through them, so it is zero. After one step they are not zero any more.
        return ["self_attn.o_proj.weight", "mlp.down_proj.weight"] if step == 0 else ATTENTION + MLP + NORMS
    if init == "zero-norms":
        # q, k, v read zeros: q = k = 0 (uniform attention), v = 0, so o_proj's input is 0 and q/k/v's weight
        # gradients (gradient × their zero input) are 0; but the output moves with v, so the gradient reaches v's
        # input and the attention norm's gain. The MLP's gate and up read zeros: SiLU(0)·0 kills both paths back.
        if step == 0:
            return ["input_layernorm.weight"]
        # after one step the attention norm is not zero: q, k, v and o_proj learn; the MLP stays dead
        return ATTENTION + ["input_layernorm.weight"]
    raise ValueError(init)
