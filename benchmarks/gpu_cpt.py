"""GPU benchmark: the smol rung's continual pretraining on one GPU, LLaMA Pro against full fine-tuning.

configs/smol-gpu.yaml as it is (SmolLM2-135M grown 30 -> 36 blocks, the built-in code corpus, sequences of 2048,
global batch 32 = 4 micro-batches of 8, bf16 autocast, no sharding), shortened to `--steps` steps, run through
`deepen.train.train` once per method, each in its own process (a clean CUDA context and peak counter).

Measured, per method:
  - tokens/s: the median of the per-step throughput deepen.train logs (metrics.jsonl), after `--warmup` steps;
  - MFU: tokens/s × the model FLOPs per token deepen.budget counts for the work this method does (LLaMA Pro:
    no backward below the first new block, weight gradients only for the new blocks) / the card's dense bf16
    peak; the FLOPs are the method's own, so a faster method does not get credit for skipped work;
  - peak memory: torch.cuda.max_memory_allocated over the run, beside deepen.budget's prediction for one GPU
    without sharding (strategy ddp).

Prints `BENCH gpu_cpt_<quantity>_<method> <value> <unit> on <card>` lines. Without a CUDA device it says so and
exits 0. About 2-3 minutes on an H100 (most of it loading, packing and evaluating, not the timed steps).

    python benchmarks/gpu_cpt.py [--steps 30] [--warmup 5] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("llama-pro", "full")
GIB = 2**30

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a part of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
)


def peak_tflops(name: str, override: float | None = None) -> float | None:
    """The card's dense bf16 peak in TFLOP/s: `override` if given, else from the table, else None (unknown)."""
    if override:
        return override
    return next((tflops for part, tflops in PEAK_BF16_TFLOPS if part.lower() in name.lower()), None)


def cuda_or_exit(script: str) -> bool:
    """True if a CUDA device is usable; else print why this benchmark is skipped (the caller exits 0)."""
    import torch

    if torch.cuda.is_available():
        return True
    print(f"{script}: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
          f"skipped. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")
    return False


def median_tokens_per_s(metrics: Path, warmup: int) -> tuple[float, int]:
    """Median logged tokens/s of the steps after the first `warmup`, and how many steps that is."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r.get("step", 0) > warmup and "tokens_per_s" in r]
    if not speeds:
        raise RuntimeError(f"{metrics} has no training steps after the first {warmup}; raise --steps")
    return statistics.median(speeds), len(speeds)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    return None if peak is None else tokens_per_s * flops_per_token / (peak * 1e12)


def bench_line(name: str, value: float | None, unit: str, card: str, fmt: str = ".3f") -> str:
    shown = "n/a" if value is None else format(value, fmt)
    return f"BENCH {name} {shown} {unit} on {card}"


def reset_peak_memory() -> bool:
    """Before a run: on a GPU, reset CUDA's peak-memory counters and return True; else use one CPU thread (a
    smoke run) and return False."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    torch.set_num_threads(1)
    return False


def peak_memory() -> dict:
    """CUDA's peak allocated and reserved bytes since reset_peak_memory()."""
    import torch

    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


def arguments(description: str, steps: int, smoke: str) -> argparse.ArgumentParser:
    """The options both GPU benchmarks take: `steps` is the default of --steps, `smoke` the help of --smoke; the
    hidden --child, --out and --general are for the runs a benchmark starts itself."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per method (default {steps})")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median (default 5)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the table")
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--general", default="general", help=argparse.SUPPRESS)
    return parser


def run_result(script: str, method: str, done: subprocess.CompletedProcess, out: Path, warmup: int) -> dict:
    """One method's run, finished: its out/result.json with the median tokens/s of its metrics.jsonl after
    `warmup` steps (and how many steps that is); exits with the run's stderr where it failed."""
    if done.returncode:
        sys.exit(f"{script}: the {method} run failed:\n{done.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    result["tokens_per_s"], result["steps_timed"] = median_tokens_per_s(out / "metrics.jsonl", warmup)
    return result


def general_corpus() -> str:
    """"general" (the built-in English, fetched once at install) where it is here, else "math" (generated): a
    bare GPU machine without the English text still runs the benchmark; the held-out score is not its point."""
    from deepen.data import load_corpus

    try:
        load_corpus("general", "heldout")
        return "general"
    except (OSError, RuntimeError, ValueError) as e:
        print(f"note: the built-in English corpus is not here ({type(e).__name__}); held-out 'general' perplexity "
              f"is measured on the built-in math corpus instead")
        return "math"


def run_config(method: str, steps: int, out: Path, smoke: bool, general: str = "general"):
    from deepen.config import load_config

    path = ROOT / ("configs/tiny-cpu.yaml" if smoke else "configs/smol-gpu.yaml")
    return load_config(path, [f"method={method}", f"train.steps={steps}", f"train.eval_every={steps}",
                              "train.eval_batches=1", f"train.save_every={steps}", f"data.general={general}",
                              f"out={out}"])


def child(method: str, steps: int, out: Path, smoke: bool, general: str) -> None:
    """One method's run; writes out/result.json with the peak memory and the card."""
    import torch

    from deepen.train import train

    config = run_config(method, steps, out, smoke, general)
    cuda = reset_peak_memory()
    peak = {}

    def callback(record, model):
        if record["step"] == steps and cuda:  # before the final model is gathered and saved
            peak.update(peak_memory())

    train(config, progress=False, callback=callback)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    (out / "result.json").write_text(json.dumps({"card": card, **peak}))


def main() -> None:
    args = arguments(__doc__.splitlines()[0], 30, "check the script end to end on any device: the tiny rung, "
                     "a few steps (numbers meaningless)").parse_args()
    if args.child:
        return child(args.child, args.steps, Path(args.out), args.smoke, args.general)
    if not args.smoke and not cuda_or_exit("gpu_cpt"):
        return

    from deepen.budget import GB, budget

    general = general_corpus()
    results = {}
    with tempfile.TemporaryDirectory(prefix="deepen-gpu-cpt-") as tmp:
        for method in METHODS:
            out = Path(tmp, method)
            cmd = [sys.executable, __file__, "--child", method, "--steps", str(args.steps), "--out", str(out),
                   "--general", general]
            done = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
            results[method] = run_result("gpu_cpt", method, done, out, args.warmup)

    card = results[METHODS[0]]["card"]
    peak = peak_tflops(card, args.peak_tflops)
    config = run_config("llama-pro", args.steps, Path("unused"), args.smoke)
    t = config.train
    print(f"{card}: dense bf16 peak {peak if peak else 'unknown (pass --peak-tflops)'} TFLOP/s; "
          f"{'configs/tiny-cpu.yaml (smoke)' if args.smoke else 'configs/smol-gpu.yaml'}, {args.steps} steps of "
          f"{t.global_batch} × {config.data.seq_len} tokens (micro-batch {t.micro_batch}), {t.precision}, "
          f"median of {results[METHODS[0]]['steps_timed']} steps")
    for method in METHODS:
        r = results[method]
        b = budget(config, gpus=1, strategy="ddp", method=method)
        r["mfu"] = mfu(r["tokens_per_s"], b.flops.model, peak)
        predicted = b.memory_total
        allocated = r.get("allocated")
        print(f"{method}: {b.trainable:,} of {b.params:,} parameters train; {b.flops.model / 1e9:.3f} GFLOP/token "
              f"(deepen.budget); {r['tokens_per_s']:,.0f} tokens/s; peak allocated "
              f"{allocated / GIB if allocated else float('nan'):.2f} GiB, predicted {predicted / GB:.2f} GB "
              f"({predicted / GIB:.2f} GiB)")
        print(bench_line(f"gpu_cpt_tokens_per_s_{method}", r["tokens_per_s"], "tokens/s", card, ".0f"))
        print(bench_line(f"gpu_cpt_mfu_{method}", r["mfu"], "of-peak", card))
        print(bench_line(f"gpu_cpt_peak_memory_{method}", allocated / GIB if allocated else None, "GiB", card, ".2f"))
        print(bench_line(f"gpu_cpt_memory_measured_over_predicted_{method}",
                         allocated / predicted if allocated else None, "x", card))
    predicted_speedup = budget(config, gpus=1, strategy="ddp").speedup
    print(f"LLaMA Pro over full: predicted {predicted_speedup:.2f}x by FLOPs")
    print(bench_line("gpu_cpt_speedup_llama_pro_over_full",
                     results["llama-pro"]["tokens_per_s"] / results["full"]["tokens_per_s"], "x", card, ".2f"))


if __name__ == "__main__":
    main()
