"""Benchmark: the memory planner (deepen.budget) against the memory a real training step uses, on CPU.

For a run config (default: the tiny rung, configs/tiny-cpu.yaml; `--rung smol`: SmolLM2-135M grown to 36 layers,
configs/smol-gpu.yaml shortened to fit a CPU) and each method (llama-pro, full), the model is set up as
deepen.train does it (build_model: grown by the config's plan, what learns set by the method; deepen.loop's
optimizer and train_step, fp32), one optimizer step is run to create the AdamW state, then the next step — every
micro-batch's forward and backward, gradient clipping, the AdamW step, zero_grad — runs under torch.profiler with
profile_memory.

What is measured: the bytes of live CPU tensors over the step, from the profiler's memory timeline (each
allocation and free of a tensor's storage, categorised by torch as parameter, optimizer state, gradient,
activation, autograd detail, input, temporary), and their peak. That is what the planner predicts: tensor bytes.
It is not the process's resident memory, which adds Python, the libraries and the allocator's free lists.
The prediction is `deepen.budget.budget(config, gpus=1, strategy="ddp").memory_total` for the same config, in
the config's precision (fp32 here; bf16 changes only the element sizes the planner already models).

Prints, per method,
    BENCH memory_measured_over_predicted_<method> <ratio> x          goal: within 0.85-1.15
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

MIB = 2**20
METHODS = ("llama-pro", "full")
RUNGS = {
    # the tiny rung as it is (global batch 8 = micro-batch 8: one micro-batch per step)
    "tiny": ("configs/tiny-cpu.yaml", []),
    # SmolLM2 on CPU: shorter sequences, 2 micro-batches per step (the gradients of the first are held while
    # the second runs, as in the GPU preset's accumulation of 4)
    "smol": ("configs/smol-gpu.yaml", ["data.seq_len=256", "train.micro_batch=1", "train.global_batch=2",
                                       "train.precision=fp32"]),
}


def measure(config, method: str, seed: int = 0) -> dict:
    """Peak live CPU tensor bytes of one training step of `config` with `method`, and the breakdown at the peak."""
    import dataclasses

    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    from deepen.config import batch_layout
    from deepen.loop import optimizer_and_schedule, train_step
    from deepen.train import build_model, model_folder

    config = dataclasses.replace(config, method=method)
    t = config.train
    torch.manual_seed(seed)
    model, _ = build_model(config, model_folder(config.model))  # grown and frozen as deepen train does it
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = optimizer_and_schedule(params, t)
    micro, accumulation = batch_layout(t.global_batch, t.micro_batch, 1)[1:]
    ids = torch.randint(0, model.config.vocab_size, (t.global_batch, config.data.seq_len),
                        generator=torch.Generator().manual_seed(seed))

    def step():  # deepen train's optimizer step on one process
        train_step(model, ids, optimizer, schedule, clip=t.clip, micro_batch=micro)

    step()  # AdamW creates its state in the first step: measure the steady state
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    timeline = MemoryProfileTimeline(prof._memory_profile())
    times, sizes = timeline._coalesce_timeline("cpu")  # sizes[i]: [unused, bytes per category...]
    totals = [sum(s[1:]) for s in sizes]
    peak = max(range(len(totals)), key=totals.__getitem__)
    names = [c.name.lower() if c is not None else "uncategorised" for c in _CATEGORY_TO_INDEX]
    breakdown = {name: sizes[peak][i + 1] for i, name in enumerate(names) if sizes[peak][i + 1]}
    return {"peak": totals[peak], "at_peak": breakdown, "start": totals[0], "seconds": time.perf_counter() - began,
            "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params),
            "accumulation": accumulation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rung", choices=sorted(RUNGS), default="tiny")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: llama-pro,full)")
    parser.add_argument("--smoke", action="store_true", help="the tiny rung at short sequences: checks the script "
                                                             "end to end")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides")
    args = parser.parse_args()
    if args.smoke:
        args.rung, args.overrides = "tiny", [*args.overrides, "data.seq_len=32"]
    torch.set_num_threads(1)

    from deepen.budget import GB, budget
    from deepen.config import load_config

    path, overrides = RUNGS[args.rung]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, path), overrides + ["train.precision=fp32"] + args.overrides)
    print(f"{path} {' '.join(overrides + args.overrides)}: micro_batch {config.train.micro_batch} × seq_len "
          f"{config.data.seq_len}, {config.train.global_batch // config.train.micro_batch} micro-batch(es) per "
          f"step, fp32, one process; torch {torch.__version__}")
    for method in args.methods.split(","):
        m = measure(config, method)
        b = budget(config, gpus=1, strategy="ddp", method=method)
        ratio = m["peak"] / b.memory_total
        print(f"{method}: {m['params']:,} params, {m['trainable']:,} trainable (profiled step: {m['seconds']:.1f} s)")
        print("  measured peak of live tensors: " + f"{m['peak'] / MIB:.1f} MiB = " + " + ".join(
            f"{k} {v / MIB:.1f}" for k, v in m["at_peak"].items()))
        print("  predicted (deepen.budget):     " + f"{b.memory_total / MIB:.1f} MiB = " + " + ".join(
            f"{k} {v / MIB:.1f}" for k, v in b.memory.items() if v))
        print(f"  ({b.memory_total / GB:.3f} GB predicted; the planner counts every component live at once)")
        print(f"BENCH memory_measured_over_predicted_{method} {ratio:.3f} x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
