"""Reference solutions of notebooks/labs/lab08_lora_rank.ipynb: each `# %% name` section replaces the exercise cell
of that name (`deepen grade --fill-from`)."""

# %% lora_params


def lora_params(shapes, r):
    return sum(r * (d_in + d_out) for d_in, d_out in shapes)  # A is r × in, B is out × r


# %% matching_rank


def matching_rank(shapes, target):
    per_rank = lora_params(shapes, 1)  # the count grows by this much with each rank
    low = max(1, int(target // per_rank))
    return min((low, low + 1), key=lambda r: abs(lora_params(shapes, r) - target))


# %% forgetting_and_gain


def forgetting_and_gain(base, end):
    forgetting = end["general"] / base["general"]  # above 1: general text got worse
    gain = base["domain"] / end["domain"]  # above 1: the domain got better
    return forgetting, gain
