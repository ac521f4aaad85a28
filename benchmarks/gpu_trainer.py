"""GPU benchmark: deepen's training step against transformers' Trainer on the same model, blocks and batch.

The 1.01B Llama of gpu_fsdp_1b.py grown 16 -> 20 blocks by LLaMA Pro, random weights, only the 4 new blocks
learning; one GPU, no FSDP, no activation checkpointing; 4 micro-batches of 8 x 2,048 tokens per optimizer step,
bf16 autocast, SDPA attention, fused AdamW (lr 2e-4, betas 0.9/0.95, weight decay 0.1, clip 1.0) for both:

- deepen: `deepen.loop.train_step` with the run config's optimizer and schedule and its frozen weights held in bf16
  (what `deepen train` does on one GPU);
- Trainer: transformers' `Trainer` with the same frozen blocks (`requires_grad`, what LLaMA-Factory's freeze tuning
  runs), `bf16=True`, `optim="adamw_torch_fused"`, gradient accumulation 4, the same random token ids.

Each in the same process, one after the other; tokens/s is the median over the timed steps (deepen: per step;
Trainer: steps timed by a callback, after --warmup). Prints `BENCH gpu_trainer_<quantity> <value> <unit> on
<card>` and the ratio deepen / Trainer. Without a CUDA device it says so and exits 0; `--smoke` runs a tiny shape
on a CPU (numbers meaningless).

    python benchmarks/gpu_trainer.py [--steps 8] [--warmup 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_cpt import bench_line, cuda_or_exit  # noqa: E402
from gpu_fsdp_1b import SHAPES  # noqa: E402
from gpu_speed import hf_config, run_config  # noqa: E402


def grown(config_folder: Path, groups: int, device: str):
    """The grown model with only its new blocks learning, as `deepen train` builds it (random weights)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from deepen.grow import grow
    from deepen.plan import llama_pro
    from deepen.trainable import select_trainable

    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(AutoConfig.from_pretrained(config_folder))
    plan = llama_pro(base.config.num_hidden_layers, groups)
    model = grow(base, plan)
    select_trainable(model, "llama-pro", plan.new_layers)
    model.config.use_cache = False
    return model.train()


def deepen_speed(config, folder: Path, groups: int, device: str, ids, steps: int, warmup: int) -> float:
    import torch

    from deepen.loop import optimizer_and_schedule, train_step
    from deepen.trainable import hold_frozen_in_bf16

    model = grown(folder, groups, device)
    hold_frozen_in_bf16(model, sharded=False)
    optimizer, schedule = optimizer_and_schedule([p for p in model.parameters() if p.requires_grad], config.train,
                                                 device)
    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        train_step(model, ids, optimizer, schedule, clip=config.train.clip, micro_batch=config.train.micro_batch,
                   autocast=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - began)
    del model, optimizer
    return ids.numel() / statistics.median(times)


def trainer_speed(config, folder: Path, groups: int, device: str, ids, steps: int, warmup: int, out: Path) -> float:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = grown(folder, groups, device)
    t = config.train
    rows = [{"input_ids": row, "labels": row} for row in ids.cpu()]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.began = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.began)

    clock = Clock()
    accumulation = t.global_batch // t.micro_batch
    arguments = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=t.micro_batch, gradient_accumulation_steps=accumulation,
        max_steps=warmup + steps, learning_rate=t.lr, adam_beta1=0.9, adam_beta2=0.95, weight_decay=t.weight_decay,
        max_grad_norm=t.clip, bf16=device == "cuda", optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
        lr_scheduler_type="cosine", warmup_steps=round(t.warmup * (warmup + steps)), logging_strategy="no",
        save_strategy="no",
        report_to=[], dataloader_drop_last=True, disable_tqdm=True, use_cpu=device == "cpu")
    trainer = Trainer(model=model, args=arguments, train_dataset=rows * (warmup + steps), callbacks=[clock])
    trainer.train()
    del trainer, model
    return ids.numel() / statistics.median(clock.times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps each (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--smoke", action="store_true", help="the same code on a CPU at a tiny shape (numbers "
                                                             "meaningless): checks the script end to end")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = 1, 1
    elif not cuda_or_exit("gpu_trainer"):
        return
    import torch

    device = "cpu" if args.smoke else "cuda"
    shape = SHAPES["smoke" if args.smoke else "1b"]
    batch = {k: shape[k] for k in ("seq_len", "global_batch", "micro_batch")}
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="deepen-gpu-trainer-") as tmp:
        folder = Path(tmp, "base")
        hf_config("smoke" if args.smoke else "1b").save_pretrained(folder)
        config = run_config(folder, "llama-pro", shape["groups"], batch, 16, device == "cuda")
        ids = torch.randint(0, shape["vocab"], (batch["global_batch"], batch["seq_len"]), device=device,
                            generator=torch.Generator(device).manual_seed(0))
        ours = deepen_speed(config, folder, shape["groups"], device, ids, args.steps, args.warmup)
        if device == "cuda":
            torch.cuda.empty_cache()
        theirs = trainer_speed(config, folder, shape["groups"], device, ids, args.steps, args.warmup, Path(tmp, "hf"))
    print(f"{card}: LLaMA Pro on the {'smoke' if args.smoke else '1.01B'} shape grown by {shape['groups']} blocks, "
          f"{batch['global_batch']} x {batch['seq_len']} tokens per step; deepen {ours:,.0f} tokens/s, Trainer "
          f"{theirs:,.0f} tokens/s")
    print(bench_line("gpu_trainer_tokens_per_s_deepen", ours, "tokens/s", card, ".0f"))
    print(bench_line("gpu_trainer_tokens_per_s_trainer", theirs, "tokens/s", card, ".0f"))
    print(bench_line("gpu_trainer_deepen_over_trainer", ours / theirs, "x", card))


if __name__ == "__main__":
    main()
