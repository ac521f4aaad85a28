"""Reference solutions of notebooks/labs/lab03_depth_upscaling.ipynb: each `# %% name` section replaces the
exercise cell of that name (`deepen grade --fill-from`)."""

# %% dus_plan
def dus_layers(n_layers, drop):
    # SOLAR: the base without its top m layers, then the base without its bottom m layers
    return list(range(n_layers - drop)) + list(range(drop, n_layers))


# %% new_layers
def new_layers(sources):
    # the first use of a base layer is the original; every later use is a new copy
    seen, new = set(), []
    for i, s in enumerate(sources):
        if s in seen:
            new.append(i)
        seen.add(s)
    return new
