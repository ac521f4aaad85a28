"""Which parameters learn, by the run's method and the manifest — one rule, used by training and counted by the
budget planner — and how a bf16 run holds the weights that do not learn (in bf16: 2 bytes each)."""

from __future__ import annotations

import torch

from deepen.grow import layer_of


def select_trainable(model: torch.nn.Module, method: str, layers: list[int], also_train: list[str] = ()) -> None:
    """Set requires_grad by the method: `full` trains everything; `llama-pro` and `blocks` only the decoder
    `layers` (for llama-pro the ones a plan added; `trained_layers` says which); `lora` only the adapters peft
    added (names with `lora_`; none on a model without them). Parameters whose name contains a part in
    `also_train` learn too (e.g. "embed_tokens", "norm")."""
    if method == "llama-pro" and not layers:
        raise ValueError("method llama-pro trains only the layers a plan added: add a grow: section to the config "
                         "or point model at a folder made by `deepen expand` (with expansion.json)")
    n_layers = model.config.num_hidden_layers
    if method == "blocks" and not all(0 <= i < n_layers for i in layers):
        raise ValueError(f"blocks={list(layers)}: the model has decoder layers 0..{n_layers - 1}")
    learning = set(layers)
    for name, p in model.named_parameters():
        p.requires_grad_(method == "full" or method in ("llama-pro", "blocks") and layer_of(name) in learning
                         or method == "lora" and "lora_" in name
                         or any(part in name for part in also_train))


def trained_layers(config, new_layers: list[int]) -> list[int]:
    """The decoder layers a run config trains when its method trains whole blocks: `blocks:` for method blocks
    (e.g. every 4th original block, the control with no new parameters), else the plan's new layers."""
    return list(config.blocks) if config.method == "blocks" else list(new_layers)


def uniform_units(model: torch.nn.Module) -> bool:
    """Whether each FSDP unit of `model` is wholly trainable or wholly frozen: each decoder layer (one unit per
    layer, as configs/accelerate/fsdp2-8gpu.yaml wraps them) and the rest (embeddings, final norm, head). True for
    llama-pro, and for blocks without also_train; false for lora (adapters inside frozen layers) and for an
    also_train that reaches into frozen layers (e.g. "norm")."""
    units: dict[int | None, set[bool]] = {}
    for name, p in model.named_parameters():
        units.setdefault(layer_of(name), set()).add(p.requires_grad)
    return all(len(learns) == 1 for learns in units.values())


def hold_frozen_in_bf16(model: torch.nn.Module, sharded: bool = True) -> bool:
    """In a bf16 run, hold the parameters that do not learn in bf16 (2 bytes, what deepen.budget counts); those
    that learn stay fp32, the master weights AdamW updates (its state is fp32 too). A sharded run (FSDP2, ZeRO-3)
    wants one original dtype per unit, so there only when `uniform_units`: a model with a unit that mixes frozen
    and trainable parameters (lora, an also_train inside frozen layers) then keeps every weight in fp32. Unsharded,
    every frozen weight is held in bf16, LoRA's base under its fp32 adapters as peft does it. Call after
    select_trainable and before the optimizer and accelerator.prepare. Returns whether it cast anything.
    (Held in bf16, SmolLM2's decoder weights alone move its function by about 4e-5 nats per token of exact KL on
    held-out Wikipedia, measured: autocast computes every linear layer from bf16 weights anyway.)

    Tied embeddings stay tied: embed_tokens and lm_head are one Parameter, cast once in place (`.data`).
    Under autocast the forward then runs as before except for the residual stream's dtype: the frozen embedding
    gives bf16 hidden states and every residual add is bf16 + bf16 (the attention and MLP outputs come from
    autocast linears), so the residual stream is bf16 throughout (it was fp32: fp32 embeddings), as it already
    was under FSDP2, which computes with bf16 copies of every weight. RMSNorm normalises in fp32 and multiplies
    by its weight after casting back to the input dtype: a frozen (bf16) norm gives bf16, a trainable (fp32)
    one promotes to fp32, and the next autocast linear takes either; the logits are bf16 and the loss upcasts
    them to fp32."""
    frozen = [p for p in model.parameters() if not p.requires_grad]  # a tied parameter is listed once
    if not frozen or sharded and not uniform_units(model):
        return False
    for p in frozen:
        p.data = p.data.to(torch.bfloat16)
    return True


def widened_to_fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with its bf16 tensors widened to fp32 on the CPU (exact: every bf16 value is an fp32 value);
    a tensor under two names (tied embeddings) stays one tensor, so it is still saved once."""
    widened: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            key = (tensor.data_ptr(), tensor.shape)
            if key not in widened:
                widened[key] = tensor.to("cpu", torch.float32)
            tensor = widened[key]
        out[name] = tensor
    return out
