"""ipywidgets explorers for the notebooks. Each one starts from defaults that make sense without a browser:
its text form (what a static viewer or a headless run shows) is the result for the current settings.

    >>> explorer = plan_explorer()      # in a notebook: the controls and the live layer map
    >>> print(explorer.summary)         # the same result as text
"""

from __future__ import annotations

from functools import lru_cache

import ipywidgets as widgets
import torch
import transformers as T

from deepen.plan import METHODS, PLACEMENTS, Plan, dus, idus, llama_pro, stack

# Model shapes to count parameters for: (config class, model class, config arguments), from the models' configs.
SHAPES = {
    "Llama-2-7B": (T.LlamaConfig, T.LlamaForCausalLM, dict(
        num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)),
    "Mistral-7B": (T.MistralConfig, T.MistralForCausalLM, dict(
        num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)),
    "SmolLM2-135M": (T.LlamaConfig, T.LlamaForCausalLM, dict(
        num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
}


@lru_cache
def shape_counts(shape: str) -> tuple[int, int]:
    """(parameters per decoder block, parameters outside the blocks) of a model shape, counted on the meta
    device (no memory): a 2-block model minus a 1-block model is one block."""
    config_cls, model_cls, kw = SHAPES[shape]
    counts = []
    for n in (1, 2):
        with torch.device("meta"):
            model = model_cls(config_cls(**{**kw, "num_hidden_layers": n}))
        counts.append(sum(p.numel() for p in model.parameters()))
    block = counts[1] - counts[0]
    return block, counts[0] - block


def make_plan(method: str, layers: int, groups: int = 8, copies: int = 1, placement: str = "interleave",
              drop: int = 8) -> Plan:
    """One plan from the explorer's controls. llama-pro uses groups, copies and placement; dus uses drop;
    idus uses drop and groups (layers per interleaved run); stack uses copies (how many times over)."""
    if method == "llama-pro":
        return llama_pro(layers, groups, copies, placement)
    if method == "dus":
        return dus(layers, drop)
    if method == "idus":
        return idus(layers, drop, groups)
    if method == "stack":
        return stack(layers, copies)
    raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")


def plan_summary(plan: Plan, shape: str) -> str:
    """The layer map and the parameter counts of `plan` applied to a model of `shape`."""
    block, rest = shape_counts(shape)
    base, grown = rest + plan.n_base * block, rest + plan.n_layers * block
    new = len(plan.new_layers) * block
    trainable = "trainable in LLaMA Pro (new blocks only)" if plan.function_preserving else "added by the plan"
    return (f"{plan}\n\n"
            f"{shape} shape, {block:,} parameters per block\n"
            f"  base   {plan.n_base:3d} blocks  {base:>16,}\n"
            f"  grown  {plan.n_layers:3d} blocks  {grown:>16,}  (+{grown / base - 1:.1%})\n"
            f"  new    {len(plan.new_layers):3d} blocks  {new:>16,}  {trainable}")


class PlanExplorer(widgets.VBox):
    """Controls (method, shape, layers, groups, copies, placement, drop) over a live layer map + counts."""

    def __init__(self, method="llama-pro", shape="Llama-2-7B", layers=None, groups=8, copies=1,
                 placement="interleave", drop=8):
        n = layers or SHAPES[shape][2]["num_hidden_layers"]
        style = {"description_width": "90px"}
        self.controls = {
            "method": widgets.Dropdown(options=list(METHODS), value=method, description="method", style=style),
            "shape": widgets.Dropdown(options=list(SHAPES), value=shape, description="shape", style=style),
            "layers": widgets.IntSlider(value=n, min=1, max=96, description="layers", style=style),
            "groups": widgets.IntSlider(value=groups, min=1, max=96, description="groups", style=style),
            "copies": widgets.IntSlider(value=copies, min=1, max=8, description="copies", style=style),
            "placement": widgets.Dropdown(options=list(PLACEMENTS), value=placement, description="placement", style=style),
            "drop": widgets.IntSlider(value=drop, min=0, max=48, description="drop", style=style),
        }
        self.output = widgets.HTML()
        super().__init__([widgets.HBox([widgets.VBox(list(self.controls.values())[:4]),
                                        widgets.VBox(list(self.controls.values())[4:])]), self.output])
        self.controls["shape"].observe(self._shape_changed, "value")
        for control in self.controls.values():
            control.observe(lambda _: self._update(), "value")
        self._update()

    # Which controls each method reads; the others are greyed out.
    USES = {"llama-pro": {"groups", "copies", "placement"}, "dus": {"drop"}, "idus": {"drop", "groups"},
            "stack": {"copies"}}

    def _shape_changed(self, change) -> None:
        self.controls["layers"].value = SHAPES[change["new"]][2]["num_hidden_layers"]

    def _update(self) -> None:
        values = {k: c.value for k, c in self.controls.items()}
        for name in ("groups", "copies", "placement", "drop"):
            self.controls[name].disabled = name not in self.USES[values["method"]]
        try:
            plan = make_plan(values["method"], values["layers"], values["groups"], values["copies"],
                             values["placement"], values["drop"])
            self.plan, self.summary = plan, plan_summary(plan, values["shape"])
        except ValueError as error:  # the plan's own message names the fix
            self.plan, self.summary = None, f"no plan: {error}"
        self.output.value = f"<pre>{self.summary}</pre>"

    def _repr_mimebundle_(self, **kwargs):
        return {**super()._repr_mimebundle_(**kwargs), "text/plain": self.summary}


def plan_explorer(**defaults) -> PlanExplorer:
    """Pick method, model shape, layers, groups, copies, placement and drop; see the layer map and the
    parameter counts. Keyword arguments set the starting values (defaults: LLaMA Pro on Llama-2-7B, 8 groups)."""
    return PlanExplorer(**defaults)
