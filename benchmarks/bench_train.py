"""Training speed and peak memory of LLaMA Pro (only the new blocks learn) against full training of the same
grown model: deepen.llama.PRESETS["toy"] (8 layers, dim 256) grown by llama_pro(groups=2) to 10 layers, 2 new.

Speed: one process, the two set-ups interleaved step by step (separate processes drift by up to 30% on a small
CPU), each step the one deepen.train runs — forward + loss + backward, clip, AdamW over the trainable
parameters — median of the timed steps after warmup. The FLOP model's prediction (deepen.budget) is printed
beside it.
Memory: each method in its own child process (so their allocations do not mix): the peak resident memory
(VmHWM) while training, minus the resident memory of the loaded model just before — gradients, AdamW state and
activations, which is what the method changes.

Prints `BENCH be_vs_full_train_speed <llama-pro / full tokens/s> x` and `BENCH be_vs_full_peak_memory
<llama-pro / full> x`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from deepen.grow import grow  # noqa: E402
from deepen.llama import PRESETS  # noqa: E402
from deepen.plan import llama_pro  # noqa: E402
from deepen.loop import train_step  # noqa: E402
from deepen.trainable import select_trainable  # noqa: E402

METHODS = ("llama-pro", "full")  # what the memory comparison runs
SPEED = (*METHODS, "lora")  # what the speed comparison runs (LoRA: adapters of as many parameters as LLaMA Pro's)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def setup(method: str, seed: int = 0):
    """(model, trainable parameters, optimizer) for one method on the grown toy model, as deepen.train sets it up
    (LoRA: peft's adapters on every projection, at the rank whose adapters have as many parameters as the new
    blocks, the frozen base in fp32 as in an fp32 run)."""
    torch.manual_seed(seed)
    config = PRESETS["toy"].to_hf()
    plan = llama_pro(config.num_hidden_layers, groups=2)
    model = grow(LlamaForCausalLM(config), plan).train()
    model.config.use_cache = False
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        new = sum(p.numel() for name, p in model.named_parameters()
                  if any(f"layers.{i}." in name for i in plan.new_layers))
        per_rank = sum(m.in_features + m.out_features for name, m in model.named_modules()
                       if name.rsplit(".", 1)[-1] in LORA_TARGETS)
        model = get_peft_model(model, LoraConfig(r=max(1, round(new / per_rank)), target_modules=LORA_TARGETS))
    select_trainable(model, method, plan.new_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))


def step(model, params, optimizer, ids: torch.Tensor) -> float:
    """Seconds for one optimizer step, deepen's train_step: forward + loss + backward, clip, AdamW."""
    start = time.perf_counter()
    train_step(model, ids, optimizer, clip=1.0)
    return time.perf_counter() - start


def rss(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def child(method: str, batch: int, seq: int, steps: int) -> None:
    """Run `steps` training steps of `method`; print JSON: resident memory before, peak while training."""
    model, params, optimizer = setup(method)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    before = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak: from here on it is the peak while training
    for _ in range(steps):
        step(model, params, optimizer, ids)
    print(json.dumps({"before": before, "peak": rss("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first (default: 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a 2-core machine more threads than free cores make "
                             "OpenMP wait, and timings swing 3-10x)")
    parser.add_argument("--smoke", action="store_true", help="a few short steps: checks the script end to end")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 2, 1
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args.batch, args.seq, args.warmup)

    from deepen import budget
    from deepen.config import load_config

    runs = {method: setup(method) for method in SPEED}
    vocab = runs["full"][0].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    total = sum(p.numel() for p in runs["full"][0].parameters())
    trainable = sum(p.numel() for p in runs["llama-pro"][1])
    print(f"toy preset grown 8 -> 10 layers (new: {llama_pro(8, groups=2).new_layers}): {total / 1e6:.1f}M params, "
          f"{trainable / 1e6:.2f}M trainable with llama-pro; batch {args.batch}x{args.seq}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    times: dict[str, list[float]] = {method: [] for method in SPEED}
    for i in range(args.warmup + args.steps):
        for method in SPEED if i % 2 == 0 else SPEED[::-1]:  # alternate who goes first
            seconds = step(*runs[method], ids)
            if i >= args.warmup:
                times[method].append(seconds)
    tokens = args.batch * args.seq
    speed = {method: tokens / statistics.median(t) for method, t in times.items()}
    for method in SPEED:
        print(f"{method:>9}: {speed[method]:,.0f} tokens/s (median of {args.steps} steps), "
              f"{sum(p.numel() for p in runs[method][1]):,} trainable")
    run = load_config(None, ["model=toy", "grow={method: llama-pro, groups: 2}", f"data.seq_len={args.seq}"])
    predicted = budget.budget(run).speedup
    print(f"FLOP model (deepen.budget, blocks below the first new one do no backward): predicted {predicted:.2f}x")
    print(f"BENCH be_vs_full_train_speed {speed['llama-pro'] / speed['full']:.2f} x")
    print(f"BENCH lora_vs_full_train_speed {speed['lora'] / speed['full']:.2f} x")
    del runs

    memory = {}
    for method in METHODS:
        done = subprocess.run([sys.executable, __file__, "--child", method, "--batch", str(args.batch), "--seq",
                               str(args.seq), "--warmup", str(args.warmup), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        memory[method] = json.loads(done.stdout.strip().splitlines()[-1])
    extra = {m: r["peak"] - r["before"] for m, r in memory.items()}
    print("peak resident memory while training, each method in its own process: " + ", ".join(
        f"{m} {r['peak'] / 2**20:.0f} MiB (model loaded: {r['before'] / 2**20:.0f} MiB, training adds "
        f"{extra[m] / 2**20:.0f} MiB)" for m, r in memory.items())
        + "; the ratio is of what training adds: gradients, AdamW state and activations")
    print(f"BENCH be_vs_full_peak_memory {extra['llama-pro'] / extra['full']:.2f} x")


if __name__ == "__main__":
    main()
