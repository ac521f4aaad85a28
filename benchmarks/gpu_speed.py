"""GPU benchmark: what the training loop's speed switches buy, measured A/B in one process on one GPU.

Each case builds its model in code (random weights: speed does not depend on them), takes `deepen.loop.train_step`
— the step `deepen train` takes — with bf16 autocast, the run config's AdamW (`optimizer_and_schedule`) and what
`deepen train` holds in bf16 (`hold_frozen_in_bf16`), on random token ids, and times `--steps` steps after
`--warmup` (CUDA synchronised; the median step):

- SmolLM2-135M's shape at the smol GPU profile's batch (sequences of 1,024, 4 micro-batches of 16 = 65,536 tokens
  per step): full fine-tuning of the base and of the grown model, LLaMA Pro (30 -> 36 blocks, the 6 new ones learn;
  the FLOP model's speed-up over the grown model trained fully: 1.38x, over the base: 1.18x), LoRA of as many trainable
  parameters (r=70; and r=72, a multiple of 8) with its frozen base in bf16 (what an unsharded run does now) and in
  fp32 (what it did before), full fine-tuning with AdamW's fused kernel off (foreach, the old default), and full
  fine-tuning and LoRA with their decoder layers compiled (train.compile);
- the 1.01B Llama of gpu_fsdp_1b.py (16 -> 20 blocks) on one GPU without FSDP or checkpointing, 4 micro-batches of
  8 x 2,048: full fine-tuning of the base and of the grown model and LLaMA Pro, with MFU (tokens/s x deepen.budget's model FLOPs per token / the card's
  dense bf16 peak).

Prints `BENCH gpu_speed_<case> <value> <unit> on <card>` lines and the ratios the issue's goals name (LoRA / full,
LLaMA Pro / full). Without a CUDA device it says so and exits 0 (`--smoke` runs the same code on a CPU at a tiny
shape, numbers meaningless). About two minutes on an H200 (a minute of it compiling).

    python benchmarks/gpu_speed.py [--steps 5] [--warmup 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_cpt import ROOT, bench_line, cuda_or_exit, peak_tflops  # noqa: E402
from gpu_fsdp_1b import SHAPES  # noqa: E402

SMOL = dict(seq_len=1024, global_batch=64, micro_batch=16)
SMOKE = dict(seq_len=32, global_batch=4, micro_batch=2)
GIB = 2**30


def hf_config(shape: str):
    """The transformers config of a case's base: SmolLM2-135M's published shape, or gpu_fsdp_1b.py's 1B."""
    from transformers import LlamaConfig

    from deepen.llama import PRESETS

    if shape == "smol":
        return PRESETS["smol"].to_hf()
    s = SHAPES["1b"] if shape == "1b" else SHAPES["smoke"]
    return LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                       max_position_embeddings=4096, tie_word_embeddings=False)


def run_config(folder: Path, method: str, groups: int, batch: dict, lora_r: int, fused: bool, compiled: bool = False):
    """The case as a run config (deepen.budget counts its FLOPs from it)."""
    from deepen.config import GrowConfig, RunConfig, merged

    grown = method in ("llama-pro", "grown-full")
    return merged(RunConfig(model=str(folder)), {
        "method": "full" if method == "grown-full" else method,
        "grow": GrowConfig(method="llama-pro", groups=groups) if grown else None, "lora": {"r": lora_r},
        "data": {"seq_len": batch["seq_len"]},
        "train": {"global_batch": batch["global_batch"], "micro_batch": batch["micro_batch"], "precision": "bf16",
                  "fused_adamw": fused, "compile": compiled}})


def measure(config, device: str, steps: int, warmup: int, frozen_sharded: bool) -> dict:
    """Median tokens/s of `steps` train_steps after `warmup`, and the peak memory, for one run config (with
    train.compile: its decoder layers compiled as deepen train compiles them; the first steps compile)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from deepen.grow import grow
    from deepen.loop import compile_layers, optimizer_and_schedule, train_step
    from deepen.train import build_model  # noqa: F401  (the same imports deepen train makes)
    from deepen.trainable import hold_frozen_in_bf16, select_trainable, trained_layers

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(config.model))
    new = []
    plan = config.plan(model.config.num_hidden_layers)
    if plan is not None:
        model, new = grow(model, plan), plan.new_layers
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=0.0,
                                                 target_modules=config.lora.targets))
    select_trainable(model, config.method, trained_layers(config, new))
    hold_frozen_in_bf16(model, sharded=frozen_sharded)
    model.config.use_cache = False
    if config.train.compile:
        compile_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(params, config.train, device)
    t = config.train
    ids = torch.randint(0, model.config.vocab_size, (t.global_batch, config.data.seq_len), device=device)
    model.train()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        train_step(model, ids, optimizer, schedule, clip=t.clip, micro_batch=t.micro_batch, autocast=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": ids.numel() / statistics.median(times), "peak_gib": peak,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the table")
    parser.add_argument("--json", help="also write every case's numbers to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="the same code on a CPU at a tiny shape (numbers "
                                                             "meaningless): checks the script end to end")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = 1, 1
    elif not cuda_or_exit("gpu_speed"):
        return
    import torch

    from deepen.budget import budget
    from deepen.reproduce import lora_rank

    device = "cpu" if args.smoke else "cuda"
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(card, args.peak_tflops)
    results = {}
    with tempfile.TemporaryDirectory(prefix="deepen-gpu-speed-") as tmp:
        shapes = {"smol": ("smoke" if args.smoke else "smol", 6 if not args.smoke else 2, SMOKE if args.smoke else SMOL),
                  "1b": ("smoke" if args.smoke else "1b", SHAPES["1b"]["groups"] if not args.smoke else 2,
                         SMOKE if args.smoke else {k: SHAPES["1b"][k] for k in SMOL})}
        folders = {}
        for name, (shape, _, _) in shapes.items():
            folders[name] = Path(tmp, name)
            hf_config(shape).save_pretrained(folders[name])  # the shape alone: config.json, no weights
        _, groups, batch = shapes["smol"]
        r = lora_rank(run_config(folders["smol"], "llama-pro", groups, batch, 16, True),
                      budget(run_config(folders["smol"], "llama-pro", groups, batch, 16, True)).trainable)
        r8 = 8 * round(r / 8)
        cases = {  # name -> (shape, method, lora rank, fused AdamW, frozen weights held as a sharded run would,
            # compiled); the compiled ones last: they take longest, and every case is printed as it ends
            "smol_full": ("smol", "full", r, True, False, False),
            "smol_full_foreach": ("smol", "full", r, False, False, False),
            "smol_llama_pro": ("smol", "llama-pro", r, True, False, False),
            "smol_grown_full": ("smol", "grown-full", r, True, False, False),
            f"smol_lora_r{r}": ("smol", "lora", r, True, False, False),
            f"smol_lora_r{r}_fp32_base": ("smol", "lora", r, True, True, False),
            f"smol_lora_r{r8}": ("smol", "lora", r8, True, False, False),
            "1b_full": ("1b", "full", r, True, False, False),
            "1b_llama_pro": ("1b", "llama-pro", r, True, False, False),
            "1b_grown_full": ("1b", "grown-full", r, True, False, False),
            "smol_full_compiled": ("smol", "full", r, True, False, True),
            f"smol_lora_r{r}_compiled": ("smol", "lora", r, True, False, True),
        }
        if r8 == r:
            cases.pop(f"smol_lora_r{r8}")
        for name, (shape, method, rank, fused, sharded, compiled) in cases.items():
            _, groups, batch = shapes[shape]
            config = run_config(folders[shape], method, groups, batch, rank, fused, compiled)
            result = measure(config, device, args.steps, args.warmup, sharded)
            flops = budget(config).flops.model
            result["mfu"] = None if peak is None else result["tokens_per_s"] * flops / (peak * 1e12)
            results[name] = result
            print(f"{name}: {result['trainable']:,} trainable; {result['tokens_per_s']:,.0f} tokens/s; MFU "
                  f"{result['mfu'] if result['mfu'] is None else format(result['mfu'], '.3f')}; peak "
                  f"{result['peak_gib'] if result['peak_gib'] is None else format(result['peak_gib'], '.2f')} GiB",
                  flush=True)
            print(bench_line(f"gpu_speed_tokens_per_s_{name}", result["tokens_per_s"], "tokens/s", card, ".0f"))
            print(bench_line(f"gpu_speed_mfu_{name}", result["mfu"], "of-peak", card))
    full = results["smol_full"]["tokens_per_s"]
    ratios = {"smol_llama_pro_over_full": results["smol_llama_pro"]["tokens_per_s"] / full,
              "smol_llama_pro_over_grown_full": results["smol_llama_pro"]["tokens_per_s"]
              / results["smol_grown_full"]["tokens_per_s"],
              "1b_llama_pro_over_grown_full": results["1b_llama_pro"]["tokens_per_s"]
              / results["1b_grown_full"]["tokens_per_s"],
              f"smol_lora_r{r}_over_full": results[f"smol_lora_r{r}"]["tokens_per_s"] / full,
              f"smol_lora_r{r}_bf16_base_over_fp32_base": results[f"smol_lora_r{r}"]["tokens_per_s"]
              / results[f"smol_lora_r{r}_fp32_base"]["tokens_per_s"],
              "smol_fused_over_foreach": full / results["smol_full_foreach"]["tokens_per_s"],
              "1b_llama_pro_over_full": results["1b_llama_pro"]["tokens_per_s"] / results["1b_full"]["tokens_per_s"],
              "smol_full_compiled_over_eager": results["smol_full_compiled"]["tokens_per_s"] / full,
              f"smol_lora_r{r}_compiled_over_full_compiled": results[f"smol_lora_r{r}_compiled"]["tokens_per_s"]
              / results["smol_full_compiled"]["tokens_per_s"]}
    for name, value in ratios.items():
        print(bench_line(f"gpu_speed_{name}", value, "x", card))
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "peak_tflops": peak, "steps": args.steps,
                                               "warmup": args.warmup, "cases": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
