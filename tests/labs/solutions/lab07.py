"""Reference solutions of notebooks/labs/lab07_choosing_m.ipynb: each `# %% name` section replaces the exercise cell
of that name (`deepen grade --fill-from`)."""

# %% seam_cosine
import torch.nn.functional as F


def seam_cosine(hidden, m):
    n_layers = len(hidden) - 1  # hidden[0] is the embeddings' output, hidden[j] the input of layer j
    seam = hidden[n_layers - m]  # what the copy of layer m reads in the grown model
    seen = hidden[m]  # what layer m read in the base
    return F.cosine_similarity(seam[:, 1:], seen[:, 1:], dim=-1).mean().item()  # per token, token 0 left out


# %% choose_m


def choose_m(hidden, threshold):
    n_layers = len(hidden) - 1
    for m in range(1, (n_layers + 1) // 2):  # m < L/2: the grown model, 2(L - m) blocks, is deeper than the base
        if seam_cosine(hidden, m) >= threshold:
            return m
    return None
