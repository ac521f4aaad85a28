"""The training loop's pieces, one of each: the optimizer and schedule, `train_step` (every step anyone takes —
`deepen train` on accelerate, the notebooks' plain loop, the benchmarks, the lab checks), held-out perplexity, and
`train_steps`, the plain loop over packed blocks that notebooks use.

    h = model(ids);  loss = CE(h[:, :-1], ids[:, 1:]);  loss.backward();  clip;  AdamW step;  schedule step
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deepen.batches import batches
from deepen.config import AUTO, PRECISIONS, TrainConfig, batch_layout


class NonFiniteLoss(FloatingPointError):
    """The loss was nan or inf; no weight was changed by that step."""


def native_bf16(device_type: str) -> bool:
    """Whether the device computes bf16 natively: CUDA with bf16 support, or a CPU with AVX-512 bf16 or AMX (where
    bf16 is emulated, on AVX2, it is several times slower than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device_type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def precision_on(precision: str, device_type: str) -> str:
    """The precision a run computes in on a device: "auto" resolved (bf16 where native, else fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == AUTO:
        return "bf16" if native_bf16(device_type) else "fp32"
    return precision


def learning_rate(train: TrainConfig, step: int) -> float:
    """The learning rate after `step` optimizer steps, a pure function of the step: linear warmup over the first
    `train.warmup` share of the steps, then a cosine from train.lr down to train.lr · min_lr_ratio at the end."""
    warmup = round(train.warmup * train.steps)
    if step < warmup:
        return train.lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, train.steps - warmup)
    return train.lr * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)) * (1 - train.min_lr_ratio) + train.min_lr_ratio)


class Schedule:
    """Sets the optimizer's learning rate to learning_rate(train, step) — the rate is the step's, computed, never
    carried from step to step — so a run resumed with another train.lr simply goes on at the new rate. `step()`
    after each optimizer step; its state is the step alone."""

    def __init__(self, optimizer, train: TrainConfig):
        self.optimizer, self.train = optimizer, train
        self.set(0)

    def set(self, step: int) -> None:
        self.last_epoch = step
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.train, step)

    def step(self) -> None:
        self.set(self.last_epoch + 1)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.set(state["last_epoch"])  # the rate at that step, from this run's train.lr


def optimizer_and_schedule(params: list, train: TrainConfig, device_type: str = "cpu"):
    """AdamW over `params` only (frozen parameters get no state), β = (0.9, 0.95), weight decay on matrices only
    (norms' gains are not decayed), its fused kernel where train.fused_adamw says (auto: on CUDA); and its
    `Schedule` (`learning_rate`)."""
    fused = device_type == "cuda" if train.fused_adamw == AUTO else bool(train.fused_adamw)
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=train.lr, betas=(0.9, 0.95), fused=fused or None)
    return optimizer, Schedule(optimizer, train)


def compile_layers(model) -> None:
    """torch.compile each decoder layer in place (train.compile), so the state dict, checkpoints and saving see the
    same modules. A layer's graph is specialised on what differs between layers (its parameters' dtype, bf16
    frozen or fp32 trainable; whether its input needs a gradient): with dynamo's default limit of 8 recompiles the
    layers past the 8th variant ran eagerly, silently (seen on an H200), so the limit allows one per layer."""
    layers = model.get_decoder().layers
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(layers) + 2)
    for layer in layers:
        layer.compile()


def next_token_loss(chunk: int | None = None):
    """The loss of a micro-batch of token ids (batch, seq): mean cross-entropy of predicting ids[:, 1:]. chunk:
    computed over pieces of `chunk` tokens, the output head and its fp32 logits for one piece at a time and
    recomputed in the backward, so no (batch, seq, vocab) fp32 logits are ever held (a model whose head is not
    sharded: not under FSDP); None: the model's own loss over the whole micro-batch."""
    from torch.utils.checkpoint import checkpoint

    def whole(model, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss  # labels shift inside: predict ids[:, 1:]

    def pieces(model, ids: torch.Tensor) -> torch.Tensor:
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]  # (batch, seq - 1, hidden)
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
        head = model.get_output_embeddings()

        def piece_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(head(h).float(), y, reduction="sum")  # (chunk, vocab) logits, then freed

        total = sum(checkpoint(piece_loss, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                    for i in range(0, len(targets), chunk))
        return total / len(targets)

    return whole if chunk is None else pieces


def train_step(model, batch, optimizer, schedule=None, *, clip: float | None = 1.0, micro_batch: int | None = None,
               accelerator=None, autocast: bool = False, loss=None) -> float:
    """One optimizer step on `batch`; returns its mean loss.

    batch: (rows, seq) token ids for next-token prediction, or rows of any kind (a list) that `loss(model,
    micro)` turns into a loss (instruction tuning, DPO: deepen.objectives). Forward and backward per micro-batch
    of at most `micro_batch` rows (the largest size that divides the batch; all rows at once when None); the
    gradients add up, each micro-batch's loss weighted 1/count, so the step is the whole batch's mean. Then the
    gradient norm clipped to `clip` (None: not clipped), the optimizer and the schedule stepped, the gradients
    cleared. A nan/inf loss raises NonFiniteLoss before any weight changes.
    accelerator: a run on accelerate (one process, DDP or FSDP2): its accumulate, backward (which divides by the
    accumulation steps: one per micro-batch), clip and the loss averaged over processes; its prepared model
    runs under its own autocast. autocast: bf16 autocast for a plain model (no accelerator)."""
    loss = loss or next_token_loss()
    size = batch_layout(len(batch), micro_batch or len(batch), 1)[1]
    micros = [batch[i:i + size] for i in range(0, len(batch), size)]  # (micro, seq) each, or lists of rows
    if accelerator is not None and len(micros) != accelerator.gradient_accumulation_steps:
        raise ValueError(f"{len(micros)} micro-batches per step, but the accelerator accumulates "
                         f"{accelerator.gradient_accumulation_steps}")
    total = 0.0
    for micro in micros:
        if accelerator is None:
            device = next(model.parameters()).device
            with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext():
                micro_loss = loss(model, micro)
            (micro_loss / len(micros)).backward()
        else:
            with accelerator.accumulate(model):
                micro_loss = loss(model, micro)
                accelerator.backward(micro_loss)
        total = total + micro_loss.detach() / len(micros)
    if accelerator is not None:
        total = accelerator.reduce(total, "mean")
    total = total.item()
    if not math.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss is {total}")
    if clip is not None:
        params = [p for p in model.parameters() if p.requires_grad]  # under FSDP2: the sharded parameters
        (accelerator.clip_grad_norm_ if accelerator is not None else torch.nn.utils.clip_grad_norm_)(params, clip)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@contextmanager
def evaluating(model):
    """The model in eval mode, without gradients, for the block; its training mode given back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def block_losses(model, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(n_blocks,) float64: each block's mean cross-entropy of predicting blocks[:, 1:] from what comes before."""
    device = next(model.parameters()).device
    out = []
    with evaluating(model):
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size].to(device)  # (batch, seq)
            logits = model(input_ids=ids).logits[:, :-1].float()  # (batch, seq - 1, vocab)
            loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (batch, seq - 1)
            out.append(loss.double().mean(1).cpu())
    return torch.cat(out)


def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean cross-entropy) over the blocks' next tokens, every token weighing the same (blocks are of equal
    length, so the mean of the blocks' means)."""
    return math.exp(block_losses(model, blocks, batch_size).mean().item())


def train_steps(model, blocks: torch.Tensor, config: TrainConfig | None = None, *, progress: bool = True,
                desc: str = "train", **changes) -> list[float]:
    """Train the parameters that require grad on `blocks` (n, seq) with `deepen train`'s recipe and defaults
    (a TrainConfig, fields changed by `changes`, e.g. steps=60, lr=2e-3, global_batch=8); return each step's loss.

    Batches of global_batch rows come from `batches(blocks, global_batch, steps, seed)`, every row once per epoch,
    so the same arguments give the same run; precision "bf16" runs under autocast."""
    train = dataclasses.replace(config or TrainConfig(), **changes)
    device = next(model.parameters()).device
    precision = precision_on(train.precision, device.type)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    optimizer, schedule = optimizer_and_schedule(params, train, device.type)
    model.train()
    losses: list[float] = []
    bar = tqdm(batches(blocks, train.global_batch, train.steps, train.seed), total=train.steps, desc=desc,
               disable=not progress)
    for ids in bar:
        try:
            losses.append(train_step(model, ids.to(device), optimizer, schedule, clip=train.clip,
                                     micro_batch=train.micro_batch, autocast=precision == "bf16",
                                     loss=next_token_loss(train.loss_chunk)))
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"{e} at step {len(losses) + 1}; lower lr (now {train.lr})"
                                + (" or use precision fp32" if precision != "fp32" else "")) from None
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses
