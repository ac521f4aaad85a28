"""What a run costs before you rent the GPUs: parameters, FLOPs per token, memory per GPU and time, for a run
config, a GPU count and a sharding strategy. The model is built on the meta device (shapes, no weights), so a
7B model costs nothing here.

    deepen budget --config configs/llama2-7b-pro.yaml --gpus 8 --gpu-memory 80 [--strategy fsdp|zero3|ddp]

Three models, each one function with its assumptions written beside it:
- `training_flops`: the FLOPs each stage does per token, given which parameters are trainable;
- `block_activation_bytes` / `head_activation_bytes`: what autograd keeps for the backward (checked in the tests
  against the tensors transformers' Llama actually saves);
- `memory`: weights, gradients and AdamW state, sharded by the strategy, plus activations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deepen import plan as plans
from deepen.config import AUTO, RunConfig, batch_layout, load_config, recipe
from deepen.grow import grow
from deepen.llama import PRESETS
from deepen.manifest import Manifest
from deepen.trainable import select_trainable, trained_layers  # the one rule for what learns: counted as trained

GB = 1e9  # decimal gigabytes, as GPU makers count them ("80 GB")
STRATEGIES = ("fsdp", "zero3", "ddp")
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100/H800 SXM (the paper's H800 has the same compute)
USABLE = 0.9  # share of GPU memory a run may plan on: the rest is CUDA context, NCCL buffers and fragmentation

# Names the budget knows offline -> deepen.llama.PRESETS (each model's published shape): shapes, never weights.
PRESET_OF = {
    "meta-llama/llama-2-7b-hf": "llama2-7b", "llama2-7b": "llama2-7b",
    "mistralai/mistral-7b-v0.1": "mistral-7b", "mistral-7b": "mistral-7b",
    "huggingfacetb/smollm2-135m": "smol", "huggingfacetb/smollm2-135m-instruct": "smol", "smollm2": "smol",
    "smollm2-135m": "smol", "smol": "smol",
    "toy": "toy",
}


def model_config(name: str):
    """The transformers config of model `name`, without its weights: a local folder's config.json, the
    architecture of a model made here (deepen.config.recipe: tiny-base), a known hub id or alias (offline, from
    deepen.llama.PRESETS), else the hub's config.json (online only)."""
    import transformers

    if Path(name, "config.json").is_file():
        return transformers.AutoConfig.from_pretrained(name)
    made = recipe(name)
    if made is not None:
        return made.architecture.to_hf()
    if name.lower() in PRESET_OF:
        return PRESETS[PRESET_OF[name.lower()]].to_hf()
    try:
        return transformers.AutoConfig.from_pretrained(name)
    except OSError:
        raise ValueError(f"cannot find the shape of model {name!r} offline; known: {', '.join(PRESET_OF)}, "
                         f"tiny-base, or give a local folder with its config.json") from None


# ---------------------------------------------------------------------------------------------------------------
# The model, stage by stage


@dataclass(frozen=True)
class Stage:
    """One step of the forward pass: the embeddings, one decoder layer, or the final norm + output head."""

    name: str
    params: int  # parameters held (a tied head holds none of its own)
    trainable: int
    matmul: int  # parameters that multiply activations: 2 FLOPs per token each in the forward
    trainable_matmul: int
    attention: int = 0  # forward FLOPs per token of the attention scores, QK^T and A·V: 4 · n_heads · head_dim · T


@dataclass(frozen=True)
class Shape:
    """What the budget needs to know about the (grown) model of a run config."""

    name: str  # e.g. "meta-llama/Llama-2-7b-hf + llama-pro(groups=8, copies=1, placement=interleave): 32 -> 40 layers"
    method: str
    stages: tuple[Stage, ...]
    hidden: int  # h
    kv_hidden: int  # n_kv_heads · head_dim
    intermediate: int  # SwiGLU width i
    heads: int
    vocab: int
    seq_len: int
    new_layers: tuple[int, ...] = ()

    @property
    def blocks(self) -> tuple[Stage, ...]:
        return self.stages[1:-1]

    @property
    def params(self) -> int:
        return sum(s.params for s in self.stages)

    @property
    def trainable(self) -> int:
        return sum(s.trainable for s in self.stages)


def meta_model(run: RunConfig) -> tuple[nn.Module, plans.Plan | None, list[int]]:
    """The run's model on the meta device grown by its `grow:` plan, the plan, and the indices of the layers
    that were added (by the plan, else by `deepen expand`, from the folder's expansion.json)."""
    from transformers import AutoModelForCausalLM

    config = run.architecture.to_hf() if run.architecture is not None else model_config(run.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = run.plan(config.num_hidden_layers)
    if plan is not None:
        return grow(model, plan), plan, plan.new_layers
    manifest = Manifest.find(run.model) if run.model is not None else None
    return model, None, manifest.new_layers if manifest else []


def lora_params(linear: nn.Linear, r: int) -> int:
    """Parameters of one LoRA adapter on `linear`: A (r × in) and B (out × r)."""
    return r * (linear.in_features + linear.out_features)


def shape_of(run: RunConfig) -> Shape:
    """Count the run's model stage by stage: parameters, trainable parameters, matmul parameters, attention."""
    model, plan, new_layers = meta_model(run)
    select_trainable(model, run.method, trained_layers(run, new_layers), run.also_train)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = c.num_key_value_heads or c.num_attention_heads
    seq_len = run.data.seq_len

    def count(module: nn.Module) -> tuple[int, int, int, int]:
        """(parameters, trainable, matmul parameters, trainable matmul parameters), LoRA adapters included."""
        params = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        linears = [(name.rsplit(".", 1)[-1], m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
        matmul = sum(m.weight.numel() for _, m in linears)
        trainable_matmul = sum(m.weight.numel() for _, m in linears if m.weight.requires_grad)
        adapters = sum(lora_params(m, run.lora.r) for name, m in linears
                       if run.method == "lora" and name in run.lora.targets)
        return params + adapters, trainable + adapters, matmul + adapters, trainable_matmul + adapters

    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head.weight is embed.weight
    e_params = embed.weight.numel()
    e_train = e_params if embed.weight.requires_grad else 0
    stages = [Stage("embeddings", e_params, e_train, 0, 0)]
    attention = 4 * c.num_attention_heads * head_dim * seq_len  # (T, d) @ (d, T) and (T, T) @ (T, d) per token
    for i, layer in enumerate(model.model.layers):
        stages.append(Stage(f"layer {i}", *count(layer), attention=attention))
    norm = model.model.norm.weight
    h_params = norm.numel() + (0 if tied else head.weight.numel())
    h_train = (norm.numel() if norm.requires_grad else 0) + (
        head.weight.numel() if head.weight.requires_grad and not tied else 0)
    stages.append(Stage("head", h_params, h_train, head.weight.numel(),
                        head.weight.numel() if head.weight.requires_grad else 0))
    name = run.model if plan is None else f"{run.model} grown by {plan.describe().splitlines()[0]}"
    return Shape(name=name, method=run.method, stages=tuple(stages), hidden=c.hidden_size,
                 kv_hidden=kv_heads * head_dim, intermediate=c.intermediate_size, heads=c.num_attention_heads,
                 vocab=c.vocab_size, seq_len=seq_len, new_layers=tuple(new_layers))


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class Flops:
    """Training FLOPs per token, by kind of work."""

    forward: float
    backward_activations: float  # gradients with respect to activations: carry the gradient down
    backward_weights: float  # gradients with respect to trainable weights
    recompute: float = 0.0  # the extra forward that activation checkpointing repeats (not model FLOPs)

    @property
    def model(self) -> float:
        """The FLOPs the method needs: what MFU counts."""
        return self.forward + self.backward_activations + self.backward_weights

    @property
    def hardware(self) -> float:
        return self.model + self.recompute


def training_flops(stages: tuple[Stage, ...] | list[Stage], checkpointing: bool = False) -> Flops:
    """FLOPs per token of one training step for the work actually done (Kaplan et al. 2020, arXiv 2001.08361;
    attention as in Narayanan et al. 2021, arXiv 2104.04473).

    A weight matrix with P parameters costs 2P per token in the forward. Its backward costs 2P for the gradient
    with respect to its input and 2P for the gradient with respect to itself. Attention scores (no parameters)
    cost A = 4·h·T forward and 2A backward. Walking up from the embeddings:
      - every stage runs forward:                                       2P + A
      - a stage runs backward only if it or a stage below it is trainable (the gradient must reach those
        parameters): activation gradients                              2P + 2A
      - trainable weights add their weight gradients:                   2P_trainable
    So full training costs 6N + 12·L·h·T per token (N: parameters that multiply activations, i.e. all but the
    input embedding table, which is a lookup). With only LLaMA Pro's new blocks trainable, the blocks below the
    first new block do no backward at all and the frozen blocks above it, and the head, do half of theirs.
    Neglected: the first trainable block's input gradient (its q/k/v and gate/up inputs) when nothing below
    needs it, norms, rotary embeddings, softmax and the loss — each under 1% at 7B. Attention is counted
    without causal masking, as is the convention. With per-layer activation checkpointing every block that runs
    backward repeats its forward (`recompute`); MFU counts model FLOPs, so recomputation shows as lower MFU.
    """
    forward = activations = weights = recompute = 0.0
    grad_below = False
    for s in stages:
        grad_below = grad_below or s.trainable > 0
        forward += 2 * s.matmul + s.attention
        weights += 2 * s.trainable_matmul
        if grad_below:
            activations += 2 * s.matmul + 2 * s.attention
            if checkpointing and s.attention:
                recompute += 2 * s.matmul + s.attention
    return Flops(forward, activations, weights, recompute)


# ---------------------------------------------------------------------------------------------------------------
# Activations


def block_activation_bytes(shape: Shape, trainable: bool, input_grad: bool, act_bytes: int = 2) -> int:
    """Bytes per token one decoder layer keeps for its backward: transformers' Llama/Mistral layer with SDPA or
    flash attention (no T×T score matrix is kept), activations of `act_bytes` (2: bf16, 4: fp32).

        h = x + Attn(RMSNorm(x));  out = h + SwiGLU(RMSNorm(h))
      - each RMSNorm keeps its input in fp32 (4h) and 1/rms (4); a trainable layer also keeps the normalised
        input for the norm's weight and the weighted result for the linear layers' weights (2 · e·h)
      - attention keeps q, k, v after rotary embedding and its output: e·(2h + 2·h_kv), and the log-sum-exp
        per head (4 · n_heads)
      - SwiGLU keeps gate, up and silu(gate) (3 · e·i); a trainable layer also down_proj's input (e·i)
    A frozen linear layer keeps nothing for its weight, so frozen layers keep less. In the lowest layer that
    runs backward with nothing below needing gradients (`input_grad=False`) the first norm keeps nothing.
    """
    h, kv, i, e = shape.hidden, shape.kv_hidden, shape.intermediate, act_bytes
    norms = 2 * (4 * h + 4) + (2 * 2 * e * h if trainable else 0) - (0 if input_grad else 4 * h + 4)
    attention = e * (2 * h + 2 * kv) + 4 * shape.heads
    mlp = (4 if trainable else 3) * e * i
    return norms + attention + mlp


def head_activation_bytes(shape: Shape, trainable: bool, act_bytes: int = 2) -> int:
    """Bytes per token the final norm and the loss keep for the backward, the vocabulary aside (that is in
    `activation_bytes`' logits): the norm's fp32 input and 1/rms (trainable: also the normalised and weighted
    inputs) and the int64 labels (8)."""
    return 4 * shape.hidden + 4 + (2 * act_bytes * shape.hidden if trainable else 0) + 8


def activation_bytes(shape: Shape, checkpointing: bool, act_bytes: int = 2) -> dict[str, float]:
    """Bytes per token of activations: what the layers keep for the backward, and the logits at their peak, the
    start of the backward: the fp32 log-softmax the loss keeps (4V), the gradient of the fp32 log-probabilities
    and, from log-softmax's backward, the gradient of the fp32 logits (4V each, whatever the activation dtype).
    By then the training loop has dropped the model's output, so the e-byte logits and their fp32 copy are gone;
    at the end of the forward they were e·V + 4V <= 8V. (With train.loss_chunk only a chunk's tokens hold them:
    `memory` counts the logits for min(tokens, chunk) tokens.)
    With per-layer checkpointing a layer keeps only its input (e·h) and one layer at a time is recomputed."""
    kept, largest = 0, 0
    grad_below = shape.stages[0].trainable > 0  # trainable embeddings: gradients flow through every layer
    for s in shape.blocks:
        input_grad = grad_below
        grad_below = grad_below or s.trainable > 0
        if not grad_below:
            continue  # below every trainable layer: no backward, nothing kept
        full = block_activation_bytes(shape, s.trainable > 0, input_grad, act_bytes)
        largest = max(largest, full)
        kept += act_bytes * shape.hidden if checkpointing else full
    head = shape.stages[-1]
    embeddings = 8 if shape.stages[0].trainable else 0  # a trainable embedding keeps the int64 token ids
    layers = (embeddings + kept + (largest if checkpointing else 0)
              + head_activation_bytes(shape, head.trainable > 0, act_bytes))
    logits = (4 + 4 + 4) * shape.vocab
    return {"activations": layers, "logits": logits}


# ---------------------------------------------------------------------------------------------------------------
# Memory per GPU


def state_bytes(strategy: str, precision: str) -> dict[str, int]:
    """Bytes per trainable parameter with AdamW, by what holds them.
    fsdp (FSDP2) and ddp: fp32 weight 4 + fp32 gradient 4 + AdamW m and v in fp32 8 = 16; bf16 copies of the
    weights exist only transiently (FSDP2 per gathered layer; ddp under autocast).
    zero3 with bf16: bf16 weight 2 + fp32 master weight 4 + fp32 gradient 4 + m, v 8 = 18."""
    weight = 6 if strategy == "zero3" and precision == "bf16" else 4
    return {"weights": weight, "gradients": 4, "optimizer": 8}


def memory(shape: Shape, strategy: str, gpus: int, micro_batch: int, checkpointing: bool,
           precision: str = "bf16", accumulation: float = 1, loss_chunk: int | None = None) -> dict[str, float]:
    """Bytes per GPU, by component, all counted as live at once (an upper bound: with one micro-batch per step
    the gradients only build up as the activations are freed, so the true peak can be lower by up to the
    gradients; with gradient accumulation the gradients of earlier micro-batches are there from the start).
      - frozen weights: 2 bytes each in bf16 (4 in fp32), as deepen.train holds them when every FSDP unit (each
        decoder layer; the embeddings, norm and head) is wholly frozen or wholly trainable — llama-pro, blocks;
        where a unit mixes them (lora, an also_train inside frozen layers) it keeps them in fp32, 4 bytes, which
        `budget` states in its notes (`frozen_in_fp32`) — and trainable weights, gradients and AdamW state
        (`state_bytes`), all divided over the GPUs by fsdp and zero3, replicated by ddp;
      - gathered (fsdp, zero3, also on one GPU: the bf16 copies are made there too): the root module (embeddings, norm, head) stays gathered in 16-bit from
        forward to backward, plus two layers in flight (the one computing and the one prefetched), plus one
        trainable layer's unsharded fp32 gradients before the reduce-scatter;
      - accumulated gradients (fsdp with accumulation > 1, on any GPU count): accelerate's `accumulate` skips the
        gradient sync on all but the last micro-batch (FSDP2 `set_requires_gradient_sync(False)`), so FSDP2
        keeps every trainable parameter's *unsharded* gradient in the compute dtype (2 bytes in bf16) until the
        reduce-scatter — not divided by the GPU count. (Syncing every micro-batch instead — accelerate's
        GradientAccumulationPlugin(sync_each_batch=True) — trades this memory for a reduce-scatter per
        micro-batch. DeepSpeed ZeRO-3 reduces every micro-batch: none.)
      - ddp buckets (>1 GPU): DDP's gradient buckets, a second fp32 copy of the trainable gradients;
      - autocast copies (ddp in bf16): autocast casts each fp32 weight to bf16 for the forward and keeps the copy
        for the backward, 2 bytes per trainable parameter (the frozen ones are held in bf16 already); under fsdp
        and zero3 these are the gathered layers above;
      - activations and logits: `activation_bytes` × micro_batch × seq_len (the logits × at most `loss_chunk`
        tokens where the loss is computed in chunks), never sharded (data parallel).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    shards = gpus if strategy in ("fsdp", "zero3") else 1
    frozen_bytes = 2 if precision == "bf16" else 4
    per = state_bytes(strategy, precision)
    trainable, frozen = shape.trainable, shape.params - shape.trainable
    out = {"frozen weights": frozen * frozen_bytes / shards}
    out.update({f"trainable {k}" if k == "weights" else k: trainable * b / shards for k, b in per.items()})
    gathered = buckets = 0.0
    if strategy in ("fsdp", "zero3"):
        root = shape.stages[0].params + shape.stages[-1].params
        largest = max(s.params for s in shape.blocks)
        largest_trainable = max((s.params for s in shape.blocks if s.trainable), default=0)
        gathered = (root + 2 * largest) * frozen_bytes + largest_trainable * 4
    if gpus > 1 and strategy == "ddp":
        buckets = trainable * 4.0
    out["gathered layers"] = gathered
    out["accumulated gradients"] = trainable * frozen_bytes if strategy == "fsdp" and accumulation > 1 else 0.0
    out["ddp buckets"] = buckets
    out["autocast copies"] = 2.0 * trainable if strategy == "ddp" and precision == "bf16" else 0.0
    act_bytes = 2 if precision == "bf16" else 4
    tokens = micro_batch * shape.seq_len
    per_token = activation_bytes(shape, checkpointing, act_bytes)
    out["activations"] = per_token["activations"] * tokens
    out["logits"] = per_token["logits"] * (tokens if loss_chunk is None else min(tokens, loss_chunk))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The budget


@dataclass
class Budget:
    """The cost of one run config on `gpus` GPUs."""

    model: str
    method: str
    strategy: str
    gpus: int
    gpu_memory: float  # GB per GPU
    precision: str
    seq_len: int
    micro_batch: int
    global_batch: int
    checkpointing: bool
    params: int
    trainable: int
    flops: Flops  # per token
    flops_full: Flops  # per token, full fine-tuning of the same model
    memory: dict[str, float]  # bytes per GPU by component
    mfu: float
    gpu_tflops: float
    tokens: float
    notes: list[str] = field(default_factory=list)

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.memory_total <= USABLE * self.gpu_memory * GB

    @property
    def accumulation(self) -> float:
        """Micro-batches per GPU per optimizer step (gradient accumulation)."""
        return self.global_batch / (self.micro_batch * self.gpus)

    @property
    def speedup(self) -> float:
        """Training speed over full fine-tuning of the same model, by model FLOPs per token."""
        return self.flops_full.model / self.flops.model

    @property
    def tokens_per_s(self) -> float:
        return self.gpus * self.gpu_tflops * 1e12 * self.mfu / self.flops.model

    @property
    def seconds(self) -> float:
        return self.tokens / self.tokens_per_s

    @property
    def days(self) -> float:
        return self.seconds / 86400

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus / 3600

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("memory_total", "fits", "accumulation", "speedup", "tokens_per_s", "seconds", "days", "gpu_hours"):
            d[key] = getattr(self, key)
        for key in ("flops", "flops_full"):
            d[key]["model"] = getattr(self, key).model
            d[key]["hardware"] = getattr(self, key).hardware
        return d


def frozen_in_fp32(shape: Shape) -> bool:
    """Whether deepen.train keeps the frozen weights of a bf16 run in fp32: when a decoder layer, or the rest
    (embeddings, final norm, head), mixes frozen and trainable parameters (deepen.train.uniform_units; FSDP2
    wants one original dtype per unit). Otherwise it holds them in bf16, as `memory` counts them."""
    embeddings, head = shape.stages[0], shape.stages[-1]
    units = [(s.params, s.trainable) for s in shape.blocks]
    units.append((embeddings.params + head.params, embeddings.trainable + head.trainable))
    return any(0 < trainable < params for params, trainable in units)


_SHAPES: dict[str, Shape] = {}


def shape_cached(run: RunConfig) -> Shape:
    """shape_of, once per distinct run config (a sweep over GPU counts reuses it)."""
    key = run.key()
    if key not in _SHAPES:
        _SHAPES[key] = shape_of(run)
    return _SHAPES[key]


def budget(run: RunConfig | str | Path, gpus: int = 1, gpu_memory: float = 80.0, strategy: str = "fsdp",
           mfu: float = 0.4, tokens: float | None = None, gpu_tflops: float = H100_BF16_TFLOPS,
           checkpointing: bool | None = None, method: str | None = None) -> Budget:
    """The budget of a run config (or the path of one) on `gpus` GPUs of `gpu_memory` GB each.
    tokens: the token budget (default: the config's steps × global_batch × seq_len); checkpointing and method
    default to the config's."""
    if not isinstance(run, RunConfig):
        run = load_config(run)
    if method is not None:
        run = dataclasses.replace(run, method=method)
    if gpus < 1 or not 0 < mfu <= 1:
        raise ValueError(f"need gpus >= 1 and 0 < mfu <= 1; got gpus={gpus}, mfu={mfu}")
    t = run.train
    precision = "fp32" if t.precision == "fp32" else "bf16"  # auto: bf16 on a GPU, what the budget plans
    if checkpointing is None:
        checkpointing = t.gradient_checkpointing if t.gradient_checkpointing != AUTO else \
            not fits_without_checkpointing(run, gpus, gpu_memory * GB, strategy)
    shape = shape_cached(run)
    full = shape_cached(dataclasses.replace(run, method="full"))
    tokens = float(tokens if tokens is not None else t.steps * t.global_batch * run.data.seq_len)
    notes = []
    try:
        micro_batch = batch_layout(t.global_batch, t.micro_batch, gpus)[1]  # what deepen train will use
    except ValueError as e:
        micro_batch = t.micro_batch
        notes.append(str(e))
    frozen = shape.params - shape.trainable
    if precision == "bf16" and frozen and strategy in ("fsdp", "zero3") and frozen_in_fp32(shape):
        notes.append(f"frozen weights are counted in bf16 (2 bytes); deepen train holds them in fp32 where an FSDP "
                     f"unit (a decoder layer; the embeddings, norm and head) mixes frozen and trainable parameters, "
                     f"as {run.method} does here: +{frozen * 2 / gpus / GB:.1f} GB per GPU")
    return Budget(model=shape.name, method=run.method, strategy=strategy, gpus=gpus, gpu_memory=gpu_memory,
                  precision=precision, seq_len=run.data.seq_len, micro_batch=micro_batch,
                  global_batch=t.global_batch, checkpointing=checkpointing, params=shape.params,
                  trainable=shape.trainable, flops=training_flops(shape.stages, checkpointing),
                  flops_full=training_flops(full.stages, checkpointing),
                  memory=memory(shape, strategy, gpus, micro_batch, checkpointing, precision,
                                t.global_batch / (micro_batch * gpus), t.loss_chunk),
                  mfu=mfu, gpu_tflops=gpu_tflops, tokens=tokens, notes=notes)


def fits_without_checkpointing(run: RunConfig, gpus: int, memory_bytes: float, strategy: str = "ddp") -> bool:
    """Whether the run's memory per GPU without activation checkpointing fits USABLE of `memory_bytes` (what
    train.gradient_checkpointing: auto asks)."""
    b = budget(run, gpus=gpus, gpu_memory=memory_bytes / GB, strategy=strategy, checkpointing=False)
    return b.memory_total <= USABLE * memory_bytes


def human(n: float) -> str:
    """66.7B, 6.55M, 12k."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def duration(seconds: float) -> str:
    """10.3 days, 5.2 h, 3 min, 40 s."""
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def table(*budgets: Budget) -> str:
    """The budgets side by side, one column each, as text."""
    b0 = budgets[0]
    rows: list[tuple[str, list[str]]] = []

    def row(label, fn):
        rows.append((label, [fn(b) for b in budgets]))

    row("method", lambda b: b.method)
    row("parameters", lambda b: f"{b.params:,}")
    row("trainable", lambda b: f"{b.trainable:,}")
    row("trainable share", lambda b: f"{b.trainable / b.params:.1%}")
    row("GFLOP/token forward", lambda b: f"{b.flops.forward / 1e9:.2f}")
    row("GFLOP/token backward", lambda b: f"{(b.flops.backward_activations + b.flops.backward_weights) / 1e9:.2f}")
    row("GFLOP/token model", lambda b: f"{b.flops.model / 1e9:.2f}")
    if any(b.checkpointing for b in budgets):
        row("GFLOP/token recompute", lambda b: f"{b.flops.recompute / 1e9:.2f}")
    row("speed-up over full", lambda b: f"{b.speedup:.2f}x")
    rows.append(("memory per GPU (GB)", ["" for _ in budgets]))
    for key in b0.memory:
        if any(b.memory.get(key) for b in budgets):
            row(f"  {key}", lambda b, key=key: f"{b.memory.get(key, 0) / GB:.1f}")
    row("  total", lambda b: f"{b.memory_total / GB:.1f}")
    row(f"fits ({USABLE:.0%} of the GPU)", lambda b: f"yes ({b.memory_total / GB:.0f} <= {USABLE * b.gpu_memory:.0f})"
        if b.fits else f"NO ({b.memory_total / GB:.0f} > {USABLE * b.gpu_memory:.0f})")
    row("gradient accumulation", lambda b: f"{b.accumulation:g}")
    row("tokens/s", lambda b: f"{b.tokens_per_s:,.0f}")
    row("time", lambda b: duration(b.seconds))
    row("GPU-hours", lambda b: f"{b.gpu_hours:,.0f}")
    width = max(len(label) for label, _ in rows)
    cols = [max(len(v[j]) for _, v in rows) for j in range(len(budgets))]
    head = (f"{b0.model}\n{b0.gpus} GPU{'s' if b0.gpus > 1 else ''} × {b0.gpu_memory:g} GB, {b0.strategy}, "
            f"{b0.precision}, micro_batch {b0.micro_batch} × seq_len {b0.seq_len}, activation checkpointing "
            f"{'on' if b0.checkpointing else 'off'}; {human(b0.tokens)} tokens at MFU {b0.mfu:.0%} of "
            f"{b0.gpu_tflops:g} TFLOP/s per GPU")
    lines = [head] + [f"{label:<{width}}  " + "  ".join(f"{v:>{c}}" for v, c in zip(values, cols))
                      for label, values in rows]
    notes = dict.fromkeys(n for b in budgets for n in b.notes)
    return "\n".join(lines + [f"note: {n}" for n in notes])


# ---------------------------------------------------------------------------------------------------------------
# `deepen budget`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config (YAML), e.g. configs/llama2-7b-pro.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, as for `deepen train`, e.g. train.micro_batch=2 method=full")
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs, all machines together (default 1)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU in GB (default 80)")
    parser.add_argument("--strategy", default="fsdp", choices=STRATEGIES,
                        help="fsdp: FSDP2, everything sharded (default); zero3: DeepSpeed ZeRO-3; ddp: replicated")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOPs utilisation to assume: the share of peak the run reaches (default 0.4)")
    parser.add_argument("--gpu-tflops", type=float, default=H100_BF16_TFLOPS,
                        help=f"dense bf16 peak TFLOP/s per GPU (default {H100_BF16_TFLOPS:g}: H100/H800; A100: 312)")
    parser.add_argument("--tokens", type=float,
                        help="token budget, e.g. 80e9 (default: the config's steps × global_batch × seq_len)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="activation checkpointing on or off (default: the config's train.gradient_checkpointing)")
    parser.add_argument("--json", action="store_true", help="print the budget as JSON")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    kwargs = dict(gpus=args.gpus, gpu_memory=args.gpu_memory, strategy=args.strategy, mfu=args.mfu,
                  tokens=args.tokens, gpu_tflops=args.gpu_tflops, checkpointing=args.checkpointing)
    budgets = [budget(config, **kwargs)]
    if config.method != "full":
        budgets.append(budget(config, method="full", **kwargs))
    if args.json:
        print(json.dumps([b.to_dict() for b in budgets], indent=2))
    else:
        print(table(*budgets))
    return 0
