"""`make demo`: the main story on the built-in offline defaults.

Real SmolLM2-135M (30 blocks) -> LLaMA Pro expansion on disk (streaming) -> proof that it is the same
function -> SOLAR depth up-scaling for contrast (how far the function moves) -> continual pretraining on the
tiny rung (configs/tiny-cpu.yaml): only the new blocks vs everything, forgetting against gain.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from deepen.checkpoint import expand
from deepen.config import load_config
from deepen.models import smollm2
from deepen.plan import dus, llama_pro
from deepen.runs import RunResult
from deepen.train import train
from deepen.verify import verify

CPT_CONFIG = "configs/tiny-cpu.yaml"  # read from the repository wherever the demo runs


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

    _step("4. Continual pretraining on the tiny rung: only the new blocks (llama-pro) vs everything (full)")
    rows = []
    for method in ("llama-pro", "full"):
        config = load_config(CPT_CONFIG, [f"method={method}", f"out={out / f'tiny-cpt-{method}'}"])
        run = RunResult.read(train(config).parent)
        rows.append({"method": method, "steps": run.steps, "general ppl before": run.base_general,
                     "general ppl after": run.last["ppl_general"], "code ppl before": run.base_domain,
                     "code ppl after": run.last["ppl_domain"], "forgetting (general x)": run.forgetting,
                     "gain (code ppl / x)": run.gain})
    table = pd.DataFrame(rows).set_index("method")
    print(table.round(2).to_string())
    table.to_csv(out / "cpt.csv")
    results["cpt"] = table.reset_index().to_dict(orient="records")
    _figure(table, out / "forgetting_vs_gain.png")

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    pro, solar = results["llama-pro"], results["dus"]
    _step("Summary")
    print(f"LLaMA Pro ({pro['plan']['n_layers']} blocks): max |logit diff| {pro['max_abs_logit_diff']:.3g}, "
          f"same generation: {pro['same_generation']} -> exactly the base's function; the new blocks can now learn.")
    print(f"SOLAR DUS ({solar['plan']['n_layers']} blocks): KL {solar['kl']:.3f} nats/token, top-1 agreement "
          f"{solar['top1_agreement']:.0%}, perplexity {solar['ppl_base']:.2f} -> {solar['ppl_grown']:.2f}: "
          f"it must be trained to recover.")
    print("Tiny-rung CPT: " + "; ".join(f"{m}: general x{r['forgetting (general x)']:.2f}, code /{r['gain (code ppl / x)']:.1f}"
                                        for m, r in table.iterrows())
          + " (forgetting: general perplexity multiplied; gain: code perplexity divided)")
    print(f"\nresults: {out / 'results.json'}, {out / 'cpt.csv'}, {out / 'forgetting_vs_gain.png'}  ({time.perf_counter() - start:.0f} s)")
    return 0 if pro["exact"] else 1


def _figure(table: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, row in table.iterrows():
        ax.scatter(row["forgetting (general x)"], row["gain (code ppl / x)"], s=80, label=method)
        ax.annotate(method, (row["forgetting (general x)"], row["gain (code ppl / x)"]), textcoords="offset points",
                    xytext=(6, 4))
    ax.set(xlabel="forgetting: general perplexity after / before", ylabel="gain: code perplexity before / after",
           title="Tiny rung: domain gain against forgetting")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
