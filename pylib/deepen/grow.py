"""Apply a layer plan to an in-memory Hugging Face model.

A decoder block computes  h = x + Attn(norm(x));  out = h + MLP(norm(h)).  Attn ends in `o_proj` and MLP in
`down_proj`, so a copy with both zeroed adds exactly 0.0 to the residual stream: x + 0.0 == x, bit for bit.
The same names and rules serve `deepen.checkpoint`, which applies a plan to a checkpoint on disk.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from deepen.plan import Plan

# Architectures whose blocks are the Llama layout (pre-norm residual, attention ending in o_proj, a dense MLP
# ending in down_proj). Gemma2/3 add post-norms on each branch: norm(0) == 0, so zeroing still adds exactly 0.
GROWABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# The output projections of each branch, relative to a decoder layer: zeroed in a function-preserving copy.
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")
# Config entries with one value per layer: grown with the plan, or save -> load gives a different model.
PER_LAYER = ("layer_types", "no_rope_layers")
LAYER_PREFIX = "model.layers."
# How a plan's new layers start: "plan" as the plan says (LLaMA Pro: o_proj and down_proj zeroed), "copy" (a plain
# copy of the source), "random" (re-initialised), "zeros" (every weight zero, norms too), "masked" (a plain copy
# whose branch outputs training multiplies by a mask ramped from 0 to 1: `BranchMasks`, MSG arXiv 2305.02869).
INITS = ("plan", "copy", "random", "zeros", "masked")
# A decoder layer's index in a parameter name, whatever wraps the model (peft's base_model.model., FSDP's and
# activation checkpointing's wrapper names): "model.layers.3.mlp.up_proj.weight" -> 3.
_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a parameter (by its name) belongs to; None for the embeddings, final norm and head."""
    m = _LAYER_IN_NAME.search(name)
    return int(m.group(1)) if m else None


def check_supported(config: dict) -> None:
    """Refuse, with the reason, a model (its config as a dict) whose blocks deepen cannot grow exactly."""
    model_type = config.get("model_type")
    if config.get("num_local_experts") or config.get("num_experts") or "moe" in str(model_type):
        raise NotImplementedError(
            f"{model_type!r} is a mixture-of-experts model: its MLP is a router over experts, not one down_proj, "
            f"so deepen does not grow it. Supported: {', '.join(GROWABLE)}.")
    if model_type not in GROWABLE:
        raise NotImplementedError(f"model_type {model_type!r} is not supported; deepen grows {', '.join(GROWABLE)}")


def grown_config(config: dict, plan: Plan) -> dict:
    """The config (as a dict) of the grown model: num_hidden_layers and every per-layer entry follow the plan."""
    check_supported(config)
    n = config["num_hidden_layers"]
    if n != plan.n_base:
        raise ValueError(f"the plan is for {plan.n_base} layers but the model has {n}; build the plan with n_layers={n}")
    out = dict(config, num_hidden_layers=plan.n_layers)
    for key in PER_LAYER:
        if isinstance(out.get(key), list):
            if len(out[key]) != n:
                raise ValueError(f"config {key!r} has {len(out[key])} entries for {n} layers")
            out[key] = [out[key][s] for s in plan.sources]
    return out


def preserves_function(plan: Plan, init: str = "plan") -> bool:
    """Whether `plan` grown with `init` computes exactly the base's function at step 0: the plan must (its new
    blocks zeroed), and the init must keep them adding 0 (zeroed as planned, all zeros, or masked at m = 0)."""
    return plan.function_preserving and init in ("plan", "zeros", "masked")


def grow(model: nn.Module, plan: Plan, init: str = "plan") -> nn.Module:
    """A new, deeper model built from `model` by `plan`; `model` is left untouched.

    init="plan" zeroes o_proj and down_proj of the layers the plan marks `zero` (LLaMA Pro). For the
    initialisation ablation, init="copy" (and "masked") keeps every new layer a plain copy of its source,
    init="random" re-initialises every new layer and init="zeros" zeroes all of a new layer's weights (norm scales
    included)."""
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {', '.join(INITS)}")
    config = model.config
    new_config_dict = grown_config(config.to_dict(), plan)
    layers = model.model.layers
    model.model.layers = nn.ModuleList()  # copy everything but the blocks, then the blocks by the plan
    try:
        new = copy.deepcopy(model)
    finally:
        model.model.layers = layers
    for key in ("num_hidden_layers", *PER_LAYER):
        if key in new_config_dict:
            setattr(new.config, key, new_config_dict[key])
    # A fresh memo per block (a shared one would hand back the same copy for a repeated source), mapping the old
    # config to the new so the copied blocks share the grown config rather than copies of the old one.
    new.model.layers = nn.ModuleList(copy.deepcopy(layers[s], {id(config): new.config}) for s in plan.sources)
    for i, (block, spec) in enumerate(zip(new.model.layers, plan.layers)):
        block.self_attn.layer_idx = i  # indexes the KV cache: a copy keeping its source's index corrupts generation
        if spec.new and init == "random":
            _reinit(new, block)
        elif spec.new and init == "zeros":
            for p in block.parameters():
                nn.init.zeros_(p)
        elif spec.zero and init == "plan":
            zero_output_projections(block)
    return new


class BranchMasks:
    """Masked growth in the style of MSG (arXiv 2305.02869): the output of each branch of the new `layers`
    (attention's o_proj, the MLP's down_proj) is multiplied by one number m, ramped by training from 0 to 1. At
    m = 0 a new block adds exactly 0 — the base's function, bit for bit, as LLaMA Pro's zeroed copy — yet its
    weights start as a full copy of its source. m multiplies the outputs, so folding it into those weights
    (`fold`) gives the same function without the mask: what is saved."""

    def __init__(self, model: nn.Module, layers: list[int]):
        self.value, self.layers = 0.0, list(layers)
        self.hooks = [model.model.layers[i].get_submodule(name).register_forward_hook(self._scale)
                      for i in self.layers for name in OUTPUT_PROJECTIONS]

    def _scale(self, module, inputs, output):
        return output * self.value

    def set(self, value: float) -> None:
        self.value = float(min(max(value, 0.0), 1.0))

    def fold(self, state: dict[str, torch.Tensor], prefix: str = LAYER_PREFIX) -> dict[str, torch.Tensor]:
        """`state` (a state dict) with the mask multiplied into the masked branches' weights and biases."""
        names = tuple(f"{prefix}{i}.{p}." for i in self.layers for p in OUTPUT_PROJECTIONS)
        return {k: v * self.value if k.startswith(names) else v for k, v in state.items()}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


@torch.no_grad()
def zero_output_projections(block: nn.Module) -> None:
    """Zero the weights (and biases) of `o_proj` and `down_proj`: the block then adds exactly 0."""
    for name in OUTPUT_PROJECTIONS:
        for p in block.get_submodule(name).parameters():
            p.zero_()


@torch.no_grad()
def _reinit(model: nn.Module, block: nn.Module) -> None:
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=model.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
