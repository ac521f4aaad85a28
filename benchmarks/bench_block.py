"""Training speed of deepen.llama.Llama against transformers' LlamaForCausalLM at the same config.

One process, the two models interleaved step by step (separate processes drift by up to 30% on a small CPU),
forward + cross-entropy + backward on the same batch, median over the timed steps after warmup.
Prints `BENCH block_vs_hf_train_speed <ours/HF> x`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from deepen.llama import PRESETS, Llama  # noqa: E402


def train_step(forward, ids: torch.Tensor) -> float:
    """Seconds for one forward + loss + backward; gradients are dropped afterwards."""
    start = time.perf_counter()
    logits = forward(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="toy", choices=sorted(PRESETS), help="model shape (default: toy)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per model (default: 16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default: 2)")
    parser.add_argument("--smoke", action="store_true", help="a few short steps: checks the script end to end")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 2, 1

    torch.manual_seed(0)
    config = PRESETS[args.preset]
    hf = LlamaForCausalLM(config.to_hf()).train()
    ours = Llama.from_hf(hf).train()
    models = {
        "ours": ours,
        "hf": lambda ids: hf(ids, use_cache=False).logits,  # no KV cache while training
    }
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    params = sum(p.numel() for p in ours.parameters())
    print(f"config {args.preset}: {params / 1e6:.1f}M params, batch {args.batch}x{args.seq}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.warmup + args.steps):
        order = list(models) if step % 2 == 0 else list(reversed(models))  # alternate who goes first
        for name in order:
            seconds = train_step(models[name], ids)
            if step >= args.warmup:
                times[name].append(seconds)
        ours.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)

    tokens = args.batch * args.seq
    speed = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, tps in speed.items():
        print(f"{name}: {tps:,.0f} training tokens/s (median of {len(times[name])} steps)")
    paired = statistics.median(h / o for o, h in zip(times["ours"], times["hf"]))  # both saw the same machine load
    print(f"median of the per-step ratios (robust to other load on the machine): {paired:.3f}")
    print(f"BENCH block_vs_hf_train_speed {speed['ours'] / speed['hf']:.3f} x")


if __name__ == "__main__":
    main()
