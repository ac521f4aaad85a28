"""`make demo`: the main story on the built-in offline defaults.

Real SmolLM2-135M (30 blocks) -> LLaMA Pro expansion on disk (streaming) -> proof that it is the same
function -> SOLAR depth up-scaling for contrast (how far the function moves).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from deepen.checkpoint import expand
from deepen.models import smollm2
from deepen.plan import dus, llama_pro
from deepen.verify import verify


def _step(title: str) -> None:
    print(f"\n== {title}")


def run(out: str | Path = "runs/demo") -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    _step("1. The base: SmolLM2-135M-Instruct, offline")
    base = smollm2()
    config = json.loads((base / "config.json").read_text())
    n = config["num_hidden_layers"]
    print(f"{n} blocks, hidden {config['hidden_size']}, {config['num_attention_heads']} heads "
          f"({config['num_key_value_heads']} k/v heads), vocab {config['vocab_size']}")

    results = {}
    for name, plan in [("llama-pro", llama_pro(n, groups=6)), ("dus", dus(n, drop=7))]:
        _step(f"2. Grow by a plan: {name}")
        print(plan)
        grown = expand(base, out / f"smollm2-{name}", plan, overwrite=True, progress=False)
        print(f"wrote {grown} (streamed shard by shard; expansion.json records the plan)")
        _step(f"3. Is it the same function? ({name})")
        report = verify(base, grown)
        print(report)
        results[name] = {"plan": plan.to_dict(), **report.to_dict()}

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    pro, solar = results["llama-pro"], results["dus"]
    _step("Summary")
    print(f"LLaMA Pro ({pro['plan']['n_layers']} blocks): max |logit diff| {pro['max_abs_logit_diff']:.3g}, "
          f"same generation: {pro['same_generation']} -> exactly the base's function; the new blocks can now learn.")
    print(f"SOLAR DUS ({solar['plan']['n_layers']} blocks): KL {solar['kl']:.3f} nats/token, top-1 agreement "
          f"{solar['top1_agreement']:.0%}, perplexity {solar['ppl_base']:.2f} -> {solar['ppl_grown']:.2f}: "
          f"it must be trained to recover.")
    print(f"\nresults: {out / 'results.json'}  ({time.perf_counter() - start:.0f} s)")
    return 0 if pro["exact"] else 1
