"""Reference solutions of notebooks/labs/lab05_after_growth.ipynb: each `# %% name` section replaces the exercise
cell of that name (`deepen grade --fill-from`)."""

# %% dpo_loss
import torch.nn.functional as F


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))  # r(chosen) - r(rejected)
    return -F.logsigmoid(margin).mean()


# %% slerp
import math


def slerp(a, b, t):
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1, 1).item()
    if abs(cos) > 0.9995:  # nearly parallel: sin(theta) ~ 0
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
