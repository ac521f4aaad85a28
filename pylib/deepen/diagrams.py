"""Concept diagrams, drawn by code (not data plots): what a plan does to the layers, why a zeroed branch adds exactly
0, and which blocks learn and where backward stops. Each returns a matplotlib Figure; notebooks save them through
deepen.plots.save into figures/."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from deepen.plan import Plan

COLORS = {"original": "#cfe2f3", "zeroed": "#f9cb9c", "copy": "#ea9999", "frozen": "#d9d9d9", "learns": "#93c47d",
          "no backward": "#ffffff"}


def layer_map(*plans: Plan, titles: tuple[str, ...] = ()) -> plt.Figure:
    """Each plan as a row of boxes, bottom layer on the left: the base layer each grown layer copies, new copies
    coloured (zeroed: adds 0, the same function; plain: changes it), lines from the base's layers."""
    fig, axes = plt.subplots(len(plans), 1, figsize=(max(8, 0.32 * max(p.n_layers for p in plans)), 2.3 * len(plans)),
                             squeeze=False, layout="constrained")
    for ax, plan, title in zip(axes[:, 0], plans, titles or [p.describe().splitlines()[0] for p in plans]):
        width = max(plan.n_layers, plan.n_base)
        for j in range(plan.n_base):  # the base, above
            ax.add_patch(Rectangle((j * width / plan.n_base, 1.6), width / plan.n_base * 0.9, 0.6,
                                   color=COLORS["original"], ec="black", lw=0.5))
            ax.text((j + 0.45) * width / plan.n_base, 1.9, str(j), ha="center", va="center", fontsize=7)
        for i, layer in enumerate(plan.layers):  # the grown model, below
            kind = "zeroed" if layer.zero else "copy" if layer.new else "original"
            ax.add_patch(Rectangle((i, 0), 0.9, 0.6, color=COLORS[kind], ec="black", lw=0.5))
            ax.text(i + 0.45, 0.3, str(layer.source), ha="center", va="center", fontsize=7)
            ax.plot([(layer.source + 0.45) * width / plan.n_base, i + 0.45], [1.6, 0.6], lw=0.6,
                    color="#cc4125" if layer.new else "#888888")
        ax.set(xlim=(-0.5, width + 0.5), ylim=(-0.4, 2.5), title=title)
        ax.text(-0.4, 1.9, "base", ha="right", va="center", fontsize=8)
        ax.text(-0.4, 0.3, "grown", ha="right", va="center", fontsize=8)
        ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, color=COLORS[k], ec="black", lw=0.5) for k in ("original", "zeroed", "copy")]
    fig.legend(handles, ["a base layer, once", "new: o_proj, down_proj zeroed (adds 0)", "new: a plain copy"],
               loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.08))
    return fig


def zeroed_branch() -> plt.Figure:
    """The residual stream through one new block: each branch ends in a zeroed projection, so it adds exactly 0."""
    fig, ax = plt.subplots(figsize=(9, 3), layout="constrained")
    y = 1.0
    ax.arrow(0.2, y, 9.2, 0, width=0.02, head_width=0.12, head_length=0.2, length_includes_head=True, color="black")
    ax.text(0.2, y + 0.15, "x", fontsize=12)
    ax.text(9.3, y + 0.15, "x + 0 + 0 = x", fontsize=11)
    for x0, label, zero in ((1.5, "RMSNorm → attention", "o_proj = 0"), (5.5, "RMSNorm → SwiGLU", "down_proj = 0")):
        ax.add_patch(Rectangle((x0, 1.6), 2.2, 0.5, color=COLORS["original"], ec="black"))
        ax.text(x0 + 1.1, 1.85, label, ha="center", va="center", fontsize=9)
        ax.add_patch(Rectangle((x0 + 2.3, 1.6), 1.0, 0.5, color=COLORS["zeroed"], ec="black"))
        ax.text(x0 + 2.8, 1.85, zero, ha="center", va="center", fontsize=8)
        ax.plot([x0 - 0.3, x0], [y, 1.6], color="black", lw=1)  # the branch reads the stream ...
        ax.plot([x0 + 3.3, x0 + 3.6], [1.6, y], color="#cc4125", lw=1)  # ... and adds its output to it
        ax.text(x0 + 3.65, y - 0.3, "+ 0.0", fontsize=10, color="#cc4125")
    ax.set(xlim=(0, 10.5), ylim=(0.4, 2.4), title="A new LLaMA Pro block: both branches end in a zeroed projection")
    ax.axis("off")
    return fig


def backward_extent(plan: Plan, trained: list[int] | None = None) -> plt.Figure:
    """Which blocks learn (the plan's new ones, or `trained`), which only pass the gradient down, and the blocks
    below the first that learns, where backward does not run at all."""
    learns = set(plan.new_layers if trained is None else trained)
    first = min(learns)
    fig, ax = plt.subplots(figsize=(max(8, 0.32 * plan.n_layers), 2.2), layout="constrained")
    for i in range(plan.n_layers):
        kind = "learns" if i in learns else "frozen" if i > first else "no backward"
        ax.add_patch(Rectangle((i, 0), 0.9, 0.6, color=COLORS[kind], ec="black", lw=0.5))
        ax.text(i + 0.45, 0.3, str(i), ha="center", va="center", fontsize=7)
    ax.arrow(plan.n_layers, -0.3, first - plan.n_layers, 0, width=0.01, head_width=0.12, head_length=0.4,
             length_includes_head=True, color="black")
    ax.text((first + plan.n_layers) / 2, -0.55, "backward runs from the loss down to the first block that learns",
            ha="center", fontsize=8)
    ax.set(xlim=(-0.5, plan.n_layers + 0.5), ylim=(-0.8, 0.9), title="Who learns, and where backward stops")
    ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, color=COLORS[k], ec="black", lw=0.5) for k in ("learns", "frozen", "no backward")]
    fig.legend(handles, ["learns (gradients, AdamW state)", "frozen: passes the gradient down only",
                         "below the first that learns: no backward"], loc="lower center", ncol=3, fontsize=8,
               bbox_to_anchor=(0.5, -0.12))
    return fig
