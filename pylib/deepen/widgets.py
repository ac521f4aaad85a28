"""ipywidgets explorers for the notebooks. Each one starts from defaults that make sense without a browser:
its text form (what a static viewer or a headless run shows) is the result for the current settings.

    >>> explorer = plan_explorer()      # in a notebook: the controls and the live layer map
    >>> print(explorer.summary)         # the same result as text
"""

from __future__ import annotations

import html
from functools import lru_cache

import ipywidgets as widgets
import torch
from transformers import AutoModelForCausalLM

from deepen.llama import PRESETS
from deepen.plan import METHODS, PLACEMENTS, Plan, build


@lru_cache
def shape_counts(shape: str) -> tuple[int, int]:
    """(parameters per decoder block, parameters outside the blocks) of a `deepen.llama.PRESETS` shape, counted
    on the meta device (no memory): a 2-block model minus a 1-block model is one block."""
    counts = []
    for n in (1, 2):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(PRESETS[shape].replace(n_layers=n).to_hf())
        counts.append(sum(p.numel() for p in model.parameters()))
    block = counts[1] - counts[0]
    return block, counts[0] - block


def plan_summary(plan: Plan, shape: str) -> str:
    """The layer map and the parameter counts of `plan` applied to a model of `shape`."""
    block, rest = shape_counts(shape)
    base, grown = rest + plan.n_base * block, rest + plan.n_layers * block
    new = len(plan.new_layers) * block
    trainable = "trainable in LLaMA Pro (new blocks only)" if plan.function_preserving else "added by the plan"
    return (f"{plan}\n\n"
            f"{shape} shape (deepen.llama.PRESETS), {block:,} parameters per block\n"
            f"  base   {plan.n_base:3d} blocks  {base:>16,}\n"
            f"  grown  {plan.n_layers:3d} blocks  {grown:>16,}  ({grown / base - 1:+.1%})\n"
            f"  new    {len(plan.new_layers):3d} blocks  {new:>16,}  {trainable}")


class PlanExplorer(widgets.VBox):
    """Controls over a live layer map + parameter counts; each method reads only its own controls (the others
    are greyed out), with the arguments of `deepen.plan.build`."""

    USES = {"llama-pro": {"groups", "copies", "placement"}, "dus": {"drop"}, "idus": {"drop", "group"},
            "stack": {"times"}, "custom": {"map"}}

    def __init__(self, method="llama-pro", shape="llama2-7b", layers=None, groups=8, copies=1,
                 placement="interleave", drop=8, group=8, times=2, map=None):
        n = layers or PRESETS[shape].n_layers
        half = n // 2
        map = map or f"0-{half - 1},{half - 1}z,{half}-{n - 1},{n - 1}z"  # two halves, a zeroed copy after each
        style = {"description_width": "80px"}

        def slider(name, value, hi):
            return widgets.IntSlider(value=value, min=0 if name == "drop" else 1, max=hi, description=name, style=style)

        self.controls = {
            "method": widgets.Dropdown(options=list(METHODS), value=method, description="method", style=style),
            "shape": widgets.Dropdown(options=list(PRESETS), value=shape, description="shape", style=style),
            "layers": slider("layers", n, 96),
            "groups": slider("groups", groups, 96),
            "copies": slider("copies", copies, 8),
            "placement": widgets.Dropdown(options=list(PLACEMENTS), value=placement, description="placement", style=style),
            "drop": slider("drop", drop, 48),
            "group": slider("group", group, 48),
            "times": slider("times", times, 4),
            "map": widgets.Text(value=map, description="map", style=style),
        }
        self.output = widgets.HTML()
        boxes = list(self.controls.values())
        super().__init__([widgets.HBox([widgets.VBox(boxes[:5]), widgets.VBox(boxes[5:])]), self.output])
        self.controls["shape"].observe(self._shape_changed, "value")
        for control in boxes:
            control.observe(lambda _: self._update(), "value")
        self._update()

    def _shape_changed(self, change) -> None:
        self.controls["layers"].value = PRESETS[change["new"]].n_layers

    def _update(self) -> None:
        values = {k: c.value for k, c in self.controls.items()}
        uses = self.USES[values["method"]]
        for name in set().union(*self.USES.values()):
            self.controls[name].disabled = name not in uses
        try:
            plan = build(values["method"], values["layers"], **{k: values[k] for k in uses})
            self.plan, self.summary = plan, plan_summary(plan, values["shape"])
        except ValueError as error:  # the plan's own message names the fix
            self.plan, self.summary = None, f"no plan: {error}"
        self.output.value = f"<pre>{html.escape(self.summary)}</pre>"

    def _repr_mimebundle_(self, **kwargs):
        return {**super()._repr_mimebundle_(**kwargs), "text/plain": self.summary}


def plan_explorer(**defaults) -> PlanExplorer:
    """Pick method, model shape, layers, groups, copies, placement, drop (and idus's group, stack's times,
    custom's map); see the layer map and the parameter counts. Keyword arguments set the starting values
    (defaults: LLaMA Pro on the Llama-2-7B shape, 8 groups -> 40 blocks)."""
    return PlanExplorer(**defaults)
