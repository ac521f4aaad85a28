"""`make reproduce` / `deepen reproduce`: the papers' comparisons, run on one base with the same domain tokens, the
same seeds, schedule and evaluation blocks for every run — only what learns differs — with what the papers claim
set beside what we measured, and whether two numbers are within noise.

1. methods   — LLaMA Pro (grown, only the new blocks learn) vs full fine-tuning of the base (SeqFT) vs LoRA with
               about as many trainable parameters vs full fine-tuning of the grown model vs training every k-th
               *original* block, adding no parameters (the control users asked the LLaMA Pro authors for);
2. placement — the same new blocks interleaved, all on top, all at the bottom;
3. n_blocks  — how many blocks to add (1, 2, 4, 8 on the tiny rung; 1, 3, 6, 10, 15 on SmolLM2);
4. init      — how the new blocks start: zeroed o_proj/down_proj (LLaMA Pro), a plain copy, random, or a full copy
               behind a mask ramped from 0 to 1 (MSG, arXiv 2305.02869); the zeroed and the masked are the base's
               function at step 0, exactly (step 0's perplexity equals the base's);
5. control   — each method trained alike on *general* text, at the rate its code run was chosen at: what training
               of that kind does to general perplexity (on a dequantised Instruct model, repair), so that a code
               run's general perplexity can be read against it ("net of repair");
6. recovery  — SOLAR: depth up-scaling (drop m = L/4) vs plain stacking (m = 0) vs the base, all trained fully
               on general text: how much the growth costs at step 0 and how fast it recovers.

Every run is one `deepen.train.train` of the rung's preset merged with the variant's changes (a RunConfig; its
folder is named by the config's key, so runs with other settings never mix); a finished run is read, not retrained,
and a killed one resumes. Forgetting and gain are deepen.runs' (against the base), each with a 95% bootstrap
interval over the held-out blocks; the drift from the base that repair cannot fake (deepen.forgetting: KL on the
base's own samples, exact KL on the held-out general blocks, the base's own answers) is measured on each finished
run's model. A learning-rate sweep picks each variant's rate on the validation half of the held-out blocks and
reports the test half.

A profile says what a rung runs where (`PROFILES`), planned from measured throughput (`MEASURED`):
    deepen reproduce                                  # the tiny rung, every experiment, 2 seeds, 2 CPU cores
    deepen reproduce --rung smol                      # SmolLM2 on a laptop CPU: LLaMA Pro against full fine-tuning
    deepen reproduce --rung smol --profile gpu        # one H200, under 10 minutes: methods and their controls
    deepen reproduce --rung smol --profile gpu-long   # an hour or more: every experiment, 3 seeds, more tokens
    deepen reproduce --rung smol --profile gpu --dry-run   # the runs and the planned minutes, nothing trained
Results: figures/05_<rung>[_<profile>]_results.csv (one row per run), _summary.csv (per variant: seeds pooled, at the
chosen rate), _claims.csv, and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from deepen import REPO, plots
from deepen.batches import HELDOUT_SETS, heldout_blocks
from deepen.budget import budget, duration, model_config, shape_of
from deepen.config import GrowConfig, RunConfig, changes_of, load_config, merged
from deepen.forgetting import MEASURES, load_drift, measure, probes_key
from deepen.plan import llama_pro
from deepen.rundir import read_metrics
from deepen.runs import RunResult, drift_difference, within_noise
from deepen.train import model_folder, train

RUNGS = ("tiny", "smol")
EXPERIMENTS = ("methods", "placement", "n_blocks", "init", "control", "recovery")
BLOCK_COUNTS = {"tiny": (1, 2, 4, 8), "smol": (1, 3, 6, 10, 15)}
INITS = {"plan": "zeroed (LLaMA Pro)", "copy": "plain copy", "random": "random", "masked": "masked copy (MSG)"}


@dataclass(frozen=True)
class Profile:
    """What `deepen reproduce --rung R --profile P` runs: the rung's preset with `changes`, these experiments, seeds
    and learning rates, where `card` (a MEASURED row) plans its time; `shows` says what it can answer."""

    preset: str
    experiments: tuple[str, ...]
    seeds: int
    card: str
    shows: str
    changes: dict = field(default_factory=dict)
    rates: dict[str, tuple[float, ...]] | None = None  # a sweep: learning rates by run kind (`kind`); None: preset's
    variants: tuple[str, ...] | None = None  # methods variants to run (by their names' start; None: all)
    controlled: tuple[str, ...] | None = None  # methods variants that get a control (None: all that run)
    jobs: int = 2  # runs at once, one process each (one GPU: 1)


# Rates of the short GPU profile, by kind of run: the methods that train a sixth of the weights or fewer (new blocks,
# every 5th block, LoRA adapters) at LLaMA Pro's 2e-4 and 3x it, since they move the function less per step; full
# fine-tuning at 2e-4 and a quarter of it, since at 2e-4 it moved the most of all (the measurement of 2026-12-04).
SHORT_RATES = {"llama-pro": (2e-4, 6e-4), "blocks": (2e-4, 6e-4), "lora": (2e-4, 6e-4), "full": (5e-5, 2e-4),
               "grown-full": (5e-5, 2e-4)}
PROFILES = {
    ("tiny", "cpu"): Profile("configs/tiny-cpu.yaml", EXPERIMENTS, 2, "tiny-cpu",
                             "the papers' six comparisons on a 2M-parameter model of Shakespeare: forgetting shows "
                             "(it is not repaired by training), but it is not a pretrained LLM"),
    ("smol", "cpu"): Profile("configs/smol-cpu.yaml", ("methods",), 1, "cpu",
                             "whether training only the new blocks moves SmolLM2's general function less than full "
                             "fine-tuning on the same 123k code tokens (drift from the base); not the other methods, "
                             "the controls or a learning-rate sweep, which need the GPU profile",
                             variants=("llama-pro", "full")),
    ("smol", "gpu"): Profile("configs/smol-gpu.yaml", ("methods", "control"), 1, "H200",
                             "the five methods on 3M code tokens each with a two-rate sweep, their drift from the base "
                             "and, for LLaMA Pro and full fine-tuning, their forgetting net of repair",
                             changes={"train": {"steps": 46, "eval_every": 46, "save_every": 46}},
                             rates=SHORT_RATES, controlled=("llama-pro", "full (SeqFT)"), jobs=1),
    ("smol", "gpu-long"): Profile("configs/smol-gpu.yaml", EXPERIMENTS, 3, "H200",
                                  "every experiment on 6M code tokens per run, 3 seeds, the two-rate sweep, a control "
                                  "for every method",
                                  changes={"train": {"steps": 96, "eval_every": 48, "save_every": 48}},
                                  rates=SHORT_RATES, jobs=1),
}
PROFILES[("tiny", "gpu")] = PROFILES[("tiny", "cpu")]


def profile_of(rung: str, profile: str) -> Profile:
    if rung not in RUNGS:
        raise ValueError(f"rung={rung!r} is not one of {', '.join(RUNGS)}")
    known = [p for r, p in PROFILES if r == rung]
    if profile not in known:
        raise ValueError(f"profile={profile!r} is not one of {', '.join(known)} (the {rung} rung's profiles)")
    return PROFILES[rung, profile]


# --------------------------------------------------------------------------------------------- planned time


@dataclass(frozen=True)
class Measured:
    """Training throughput measured on one card for the smol rung's methods (deepen reproduce's own runs)."""

    card: str
    date: str
    setup: str
    tokens_per_s: dict[str, float]  # by kind of run (`kind`)
    overhead_s: float  # per run: loading, evaluating at the start and the end, saving, measuring the drift
    preset: str  # the config the runs were made with (their FLOPs per token scale the plan to other shapes)


MEASURED = {
    "H200": Measured("one NVIDIA H200", "2026-12-04", "configs/smol-gpu.yaml: sequences of 1,024, 4 micro-batches "
                     "of 16, bf16, fused AdamW, LoRA's base in bf16; the runs of deepen reproduce --rung smol --profile "
                     "gpu (each kind's mean over its two rates; 411 s for its 12 runs)",
                     {"llama-pro": 146_036, "full": 135_172, "lora": 92_986, "grown-full": 109_486, "blocks": 166_531},
                     10.0, "configs/smol-gpu.yaml"),
    "cpu": Measured("2 x86 cores with AVX2 (no native bf16)", "2026-12-01", "configs/smol-cpu.yaml: sequences of "
                    "256, batches of 8, fp32, 2 runs at once; deepen reproduce --rung smol (figures/05_smol_results.csv "
                    "then); the overhead per run is not measured there: cpu-bf16's, scaled by the ratio of LLaMA Pro's "
                    "tokens/s",
                    {"llama-pro": 77.6, "full": 61.3, "lora": 62.5, "grown-full": 52.9, "blocks": 66.5},
                    410.0 * 135.3 / 77.6, "configs/smol-cpu.yaml"),
    "cpu-bf16": Measured("2 x86 cores with AVX-512 bf16", "2026-12-04", "configs/smol-cpu.yaml: sequences of 256, "
                         "batches of 8, precision auto (bf16 there), 2 runs at once; deepen reproduce --rung smol "
                         "(1,767 s for its 2 runs)", {"llama-pro": 135.3, "full": 109.1}, 410.0,
                         "configs/smol-cpu.yaml"),
}


def kind(config: RunConfig) -> str:
    """The kind of run throughput is measured by: its method, "grown-full" for full training of a grown model."""
    return "grown-full" if config.method == "full" and config.grow is not None else config.method


def planned_seconds(configs: list[RunConfig], card: str, jobs: int = 1) -> float | None:
    """Seconds the runs take on `card` (a MEASURED row), `jobs` at a time: each run's tokens at the measured
    tokens/s of its kind (measured as the profile runs them), scaled by its FLOPs per token against the measured
    run's (deepen.budget), plus the overhead per run, the sum spread over the jobs; None for a card, or a kind of
    run, with no measurement."""
    if card not in MEASURED or any(kind(c) not in MEASURED[card].tokens_per_s for c in configs):
        return None
    m = MEASURED[card]
    reference = load_config(REPO / m.preset)
    seconds = 0.0
    for config in configs:
        k = kind(config)
        ref = dataclasses.replace(reference, method=config.method, grow=reference.grow if k in ("llama-pro",
                                                                                               "grown-full") else None,
                                  blocks=config.blocks, lora=config.lora)
        tokens = config.train.steps * config.train.global_batch * config.data.seq_len
        scale = budget(config).flops.model / budget(ref).flops.model
        seconds += tokens / m.tokens_per_s[k] * scale + m.overhead_s
    return seconds / max(1, min(jobs, len(configs)))


# --------------------------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Run:
    """One training run: a name (its folder, without the rate, seed and key; the run's identity) and the changes to
    the rung's preset (deepen.config.merged)."""

    name: str
    changes: dict = field(compare=False, hash=False)


@dataclass(frozen=True)
class Entry:
    """A row of an experiment: which run stands for which variant (and, for a control, the methods variant whose
    general perplexity it is read against)."""

    experiment: str
    variant: str
    run: Run
    controls: str | None = None


def rung_config(rung: str, profile: str = "cpu", changes: dict | None = None) -> RunConfig:
    """The rung's preset with the profile's changes and then `changes`."""
    p = profile_of(rung, profile)
    return merged(merged(load_config(REPO / p.preset), p.changes), changes or {})


def _pro(groups: int, placement: str = "interleave", init: str = "plan") -> dict:
    return {"grow": GrowConfig(method="llama-pro", groups=groups, copies=1, placement=placement, init=init),
            "method": "llama-pro"}


def lora_rank(config: RunConfig, target: int) -> int:
    """The LoRA rank whose adapters (on the config's lora.targets of the base) have closest to `target` parameters."""
    one = merged(config, {"grow": None, "method": "lora", "lora": {"r": 1}})
    return max(1, round(target / shape_of(one).trainable))


def plan_runs(rung: str, profile: str = "cpu", changes: dict | None = None) -> list[Entry]:
    """The experiments' entries for a rung (its config's grow.groups is the reference LLaMA Pro run)."""
    config = rung_config(rung, profile, changes)
    n = model_config(config.model).num_hidden_layers
    groups = config.grow.groups if config.grow and config.grow.method == "llama-pro" and config.grow.groups else 2
    plan = llama_pro(n, groups)
    pro = Run(f"llama-pro-{groups}", _pro(groups))
    r = lora_rank(config, shape_of(merged(config, pro.changes)).trainable)
    copied = sorted({plan.layers[i].source for i in plan.new_layers})
    general = {"data": {"domain": config.data.general}}  # trained on the base's own kind of text
    methods = [
        ("llama-pro", pro),
        ("full (SeqFT)", Run("full", {"grow": None, "method": "full"})),
        (f"lora r={r}", Run(f"lora-r{r}", {"grow": None, "method": "lora", "lora": {"r": r}})),
        ("grown, full", Run(f"grown-full-{groups}", {**_pro(groups), "method": "full"})),
        (f"every {_ordinal(n // groups)} original block",
         Run("blocks-" + "-".join(map(str, copied)), {"grow": None, "method": "blocks", "blocks": copied})),
    ]
    entries = [Entry("methods", variant, run) for variant, run in methods]
    for placement in ("interleave", "top", "bottom"):
        run = pro if placement == "interleave" else Run(f"llama-pro-{groups}-{placement}", _pro(groups, placement))
        entries.append(Entry("placement", placement, run))
    for g in (g for g in BLOCK_COUNTS[rung] if n % g == 0):
        entries.append(Entry("n_blocks", f"{g} new", pro if g == groups else Run(f"llama-pro-{g}", _pro(g))))
    for init, label in INITS.items():
        run = pro if init == "plan" else Run(f"llama-pro-{groups}-{init}", _pro(groups, init=init))
        entries.append(Entry("init", label, run))
    base_general = Run("general-full", {"grow": None, "method": "full", **general})
    for variant, run in methods:
        on_general = base_general if run.name == "full" else Run(f"general-{run.name}", {**run.changes, **general})
        entries.append(Entry("control", f"{variant} on general", on_general, controls=variant))
    m = n // 4
    entries += [
        Entry("recovery", "base", base_general),
        Entry("recovery", f"DUS m={m} ({2 * (n - m)} layers)",
              Run(f"general-dus-{m}", {"grow": GrowConfig(method="dus", drop=m), "method": "full", **general})),
        Entry("recovery", f"stack m=0 ({2 * n} layers)",
              Run("general-stack", {"grow": GrowConfig(method="dus", drop=0), "method": "full", **general})),
    ]
    p = PROFILES[rung, profile]
    if p.variants is not None:  # the profile's methods variants (and their controls)
        entries = [e for e in entries if e.experiment not in ("methods", "control")
                   or (e.controls or e.variant).startswith(p.variants)]
    if p.controlled is not None:
        entries = [e for e in entries if e.experiment != "control" or e.controls.startswith(p.controlled)]
    return entries


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def parse_sweep(sweep: str | None) -> list[float] | None:
    """The learning rates of "lr=1e-4,3e-4,1e-3" (None: no sweep)."""
    if not sweep:
        return None
    key, _, values = sweep.partition("=")
    if key.strip() != "lr" or not values:
        raise ValueError(f"--sweep {sweep!r}: write lr=a,b,c (only the learning rate is swept)")
    try:
        rates = [float(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--sweep {sweep!r}: the learning rates must be numbers, e.g. lr=1e-4,3e-4") from None
    if len(set(rates)) < len(rates) or not all(r > 0 for r in rates):
        raise ValueError(f"--sweep {sweep!r}: give distinct positive learning rates")
    return rates


@dataclass(frozen=True)
class Job:
    """One run to train: an entry's run at one seed and learning rate, as a whole config (its out: its folder)."""

    entry: Entry
    seed: int
    lr: float | None  # a swept rate (None: the preset's)
    config: RunConfig = field(hash=False, compare=False)

    @property
    def folder(self) -> Path:
        return Path(self.config.out)


def jobs_of(entries: list[Entry], seeds: int, rates, root: Path, base: RunConfig) -> list[Job]:
    """The jobs of `entries`: each run at each of its rates (`rates`: one list for every run, or a dict by `kind`,
    or None for the preset's) and seed, each in root/<name>[-lr<rate>]-s<seed>-<config key>."""
    out = []
    for e in entries:
        config = merged(base, e.run.changes)
        by_kind = rates.get(kind(config)) if isinstance(rates, dict) else rates
        for lr in by_kind or [None]:
            for seed in range(seeds):
                job = merged(config, {"train": {"seed": seed, **({"lr": lr} if lr is not None else {})}})
                name = e.run.name + (f"-lr{lr:g}" if lr is not None else "") + f"-s{seed}"
                job.out = str(root / f"{name}-{job.key()}")
                out.append(Job(e, seed, lr, job))
    return out


def _one(args: tuple) -> None:
    """Train one run (in a worker process); a finished run returns at once."""
    config, threads = args
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()  # one progress bar for the whole reproduction, not a loading bar per run
    logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    train(config, progress=False)


def _train_all(jobs: list[Job], workers: int, threads: int | None, bar) -> None:
    work = [(job.config, threads) for job in {job.folder: job for job in jobs}.values()]
    if workers == 1:
        for args in work:
            _one(args)
            bar.update()
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        try:
            for future in as_completed([pool.submit(_one, args) for args in work]):
                future.result()  # a failed run fails the whole reproduction, with its error
                bar.update()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # not the runs queued behind it
            raise


def _at_chosen_rates(controls: list[Job], chosen: dict[str, float], seeds: int, root: Path,
                     base: RunConfig) -> list[Job]:
    """The control jobs, each at the rate its methods variant was chosen at (its own jobs, rate-less, otherwise)."""
    out = []
    for job in controls:
        lr = chosen.get(job.entry.controls)
        if lr is None:
            out.append(job)
        elif not any(j.entry == job.entry and j.seed == job.seed and j.lr == lr for j in out):
            out += [j for j in jobs_of([job.entry], seeds, [lr], root, base) if j.seed == job.seed]
    return out


def run(rung: str = "tiny", profile: str = "cpu", seeds: int | None = None, jobs: int | None = None,
        overrides: list[str] = (), root: str | Path | None = None, experiments: tuple[str, ...] | None = None,
        sweep: str | None = None, threads: int | None = 1, progress: bool = True,
        out: str | Path | None = None, train_runs: bool = True) -> pd.DataFrame:
    """Run (or pick up the finished) runs of the profile's experiments (or `experiments`) for `seeds` seeds with
    `jobs` processes, at the profile's learning rates (or those of `sweep`, "lr=a,b"; "" for none); measure each
    finished run's drift from the base; write the CSVs and figures into `out` (default figures/); return the
    per-run results. `overrides` ("key=value") apply to every run. Controls train after the runs they control, at
    the rate chosen for them. threads: torch threads per run (None: as they are). train_runs=False: only read the
    run folders (their metrics, per-block losses and drift.json; no model needed) into the tables and figures."""
    from tqdm.auto import tqdm

    p = profile_of(rung, profile)
    base = rung_config(rung, profile, changes_of(list(overrides)))  # a bad override fails here, before any work
    experiments = experiments or p.experiments
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    seeds = p.seeds if seeds is None else seeds
    jobs = p.jobs if jobs is None else jobs
    if seeds < 1 or jobs < 1:
        raise ValueError(f"seeds and jobs must be at least 1, got seeds={seeds}, jobs={jobs}")
    rates = parse_sweep(sweep) if sweep is not None else p.rates
    root = Path(root) if root is not None else runs_root(rung, profile)
    entries = [e for e in plan_runs(rung, profile, changes_of(list(overrides))) if e.experiment in experiments]
    first = jobs_of([e for e in entries if e.controls is None], seeds, rates, root, base)
    later = jobs_of([e for e in entries if e.controls is not None], seeds, None, root, base)
    bar = tqdm(total=len({j.folder for j in first}) + len({j.entry.run for j in later}) * seeds,
               desc=f"reproduce {rung} ({profile})", disable=not progress or not train_runs)
    if train_runs:
        _train_all(first, jobs, threads, bar)
    part = "test" if rates else "all"
    chosen = {}
    if rates and later and any(j.entry.experiment == "methods" for j in first):  # the controls at the rate chosen
        results = pd.DataFrame([_row(job, part) for job in first])  # for the methods variant each controls
        chosen = {variant: lr for (experiment, variant), lr in chosen_rates(results).items() if experiment == "methods"}
        later = _at_chosen_rates(later, chosen, seeds, root, base)
    if train_runs:
        _train_all(later, jobs, threads, bar)
    bar.close()
    todo = first + later
    if train_runs:
        measure_drift(todo, base, progress)

    results = pd.DataFrame([_row(job, part) for job in todo])
    pooled = pool_seeds(todo, results)
    summary = summarise(results, pooled, todo)
    claims = check_claims(summary, pooled)
    paired = pairs(todo, "methods")
    prefix = results_prefix(rung, profile)
    out = Path(out) if out is not None else plots.figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / f"{prefix}_results.csv", index=False, float_format="%.6g")
    summary.to_csv(out / f"{prefix}_summary.csv", index=False, float_format="%.6g")
    claims.to_csv(out / f"{prefix}_claims.csv", index=False)
    if len(paired):
        paired.to_csv(out / f"{prefix}_pairs.csv", index=False, float_format="%.6g")
    figures(results, summary, prefix, out)
    return results


def run_folder(rung: str, variant: str, profile: str = "cpu", experiment: str = "methods", seed: int = 0,
               lr: float | None = None) -> Path | None:
    """The folder of one run of a reproduction (runs/reproduce/...; its model in model/ once finished), e.g.
    run_folder("smol", "llama-pro") for the CPU profile's LLaMA Pro run; None if it was not run. lr: the rate, for a
    profile that sweeps."""
    base = rung_config(rung, profile)
    entries = [e for e in plan_runs(rung, profile) if (e.experiment, e.variant) == (experiment, variant)]
    if not entries:
        raise ValueError(f"the {rung} rung's {profile} profile has no {experiment} run {variant!r}")
    rates = [lr] if lr is not None else PROFILES[rung, profile].rates
    for job in jobs_of(entries, seed + 1, rates, runs_root(rung, profile), base):
        if job.seed == seed and job.folder.is_dir():
            return job.folder
    return None


def results_prefix(rung: str, profile: str) -> str:
    """figures/05_<rung>[_<profile>]: the CPU profile's tables without a suffix."""
    return f"05_{rung}" + ("" if profile == "cpu" else f"_{profile.replace('-', '_')}")


def runs_root(rung: str, profile: str) -> Path:
    """runs/reproduce/<rung>[-<profile>] in the repository (else the working directory)."""
    suffix = "" if profile == "cpu" else f"-{profile}"
    return (REPO if (REPO / "pyproject.toml").is_file() else Path.cwd()) / "runs" / "reproduce" / f"{rung}{suffix}"


def measure_drift(jobs: list[Job], base: RunConfig, progress: bool = True) -> None:
    """Each finished run's drift from the base (deepen.forgetting), scored once per run folder and probes
    (drift.json; scored anew if it was scored on other probes): on the rung's held-out general blocks and the base's
    own samples, on a GPU where there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = model_folder(base.model, progress)
    held = _heldout_set(base)
    key = probes_key(path, base.data.general, held.samples, held.sample_tokens, 0, device)
    todo = [job for job in {j.folder: j for j in jobs}.values() if (load_drift(job.folder) or {}).get("probes") != key]
    if not todo:
        return
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # the runs may have left this process at one thread
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    blocks = heldout_blocks(base.data.general, tokenizer, base.data.seq_len,
                            base.train.eval_batches * base.train.global_batch)
    say = print if progress else (lambda _: None)
    from tqdm.auto import tqdm

    for job in tqdm(todo, desc="drift from the base", disable=not progress):
        measure(job.folder, model, path, tokenizer, base.data.general, blocks, samples=held.samples,
                new_tokens=held.sample_tokens, batch_size=base.train.micro_batch, progress=say)


def _heldout_set(config: RunConfig):
    """The named held-out set of the rung whose general corpus the config scores on (its sample sizes)."""
    return next((h for h in HELDOUT_SETS.values() if h.general == config.data.general), HELDOUT_SETS["smol"])


def _row(job: Job, part: str) -> dict:
    run = RunResult.read(job.folder)
    if not run.evaluations:
        raise ValueError(f"{job.folder} has no per-block losses (made by an older deepen): remove it to train it again")
    shape = shape_of(run.config)
    return {
        "experiment": job.entry.experiment, "variant": job.entry.variant, "run": job.entry.run.name,
        "seed": job.seed, "lr": run.config.train.lr, "part": part, "method": run.config.method,
        "layers": len(shape.blocks), "params": shape.params, "trainable_params": shape.trainable,
        **run.summary(part), "validation_domain_ppl": run.ppl("domain", "last", "validation" if part == "test"
                                                                 else "all"),
        "final_loss": run.final_loss, "tokens_per_s": run.tokens_per_s, "train_seconds": run.train_seconds,
        "folder": _shown(job.folder),
    }


def _shown(folder: Path) -> str:
    """A run folder as the tables show it: relative to the repository when inside it (no machine paths)."""
    folder = Path(folder).resolve()
    return str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder)


def chosen_rates(results: pd.DataFrame) -> dict[tuple[str, str], float]:
    """{(experiment, variant): the learning rate with the lowest validation domain perplexity (mean over seeds)}; a
    control's is the one it ran at. A diverged rate (nan or inf) is never chosen over a finite one."""
    scores = results.assign(score=results["validation_domain_ppl"].where(np.isfinite(results["validation_domain_ppl"]),
                                                                          np.inf))
    return (scores.groupby(["experiment", "variant", "lr"], sort=False)["score"].mean().reset_index()
            .sort_values("score", kind="stable").groupby(["experiment", "variant"], sort=False).first()["lr"].to_dict())


def pool_seeds(jobs: list[Job], results: pd.DataFrame) -> dict[tuple[str, str], RunResult]:
    """{(experiment, variant): the seeds of its chosen learning rate pooled into one result}."""
    pooled = {}
    for key, lr in chosen_rates(results).items():
        runs = [RunResult.read(j.folder) for j in jobs if (j.entry.experiment, j.entry.variant) == key
                and np.isclose(j.config.train.lr, lr)]
        runs = list({r.folder: r for r in runs}.values())
        pooled[key] = RunResult.pooled(runs, results["part"].iloc[0])
    return pooled


PAIRED = ("forgetting", "gain", *MEASURES)  # what `pairs` compares: ratios against the base, then drift measures


def pairs(jobs: list[Job], experiment: str = "methods") -> pd.DataFrame:
    """Every run of `experiment` (each variant at each learning rate, seeds pooled) against every other, paired on
    the same held-out blocks and probe items: for forgetting and gain the ratio a / b (1: the same), for each drift
    measure the difference a - b (0: the same), with its 95% interval and a verdict — "lower", "higher" or "within
    noise" (the interval holds the no-difference value). Reported on all the held-out blocks. This is how to read,
    e.g., whether one method reaches another's gain with less drift, across learning rates."""
    runs: dict[tuple[str, float], list[RunResult]] = {}
    for job in jobs:
        if job.entry.experiment == experiment:
            runs.setdefault((job.entry.variant, job.config.train.lr), []).append(RunResult.read(job.folder))
    pooled = {key: RunResult.pooled(list({r.folder: r for r in group}.values())) for key, group in runs.items()}
    rows = []
    keys = list(pooled)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            for metric in PAIRED:
                if metric in MEASURES:
                    if metric not in pooled[a].drift or metric not in pooled[b].drift:
                        continue
                    value, lo, hi = drift_difference(pooled[a], pooled[b], metric)
                    same = 0.0
                else:
                    value, lo, hi = within_noise(pooled[a], pooled[b], metric, "all")
                    same = 1.0
                verdict = "within noise" if lo <= same <= hi else "lower" if hi < same else "higher"
                rows.append({"a": a[0], "a_lr": a[1], "b": b[0], "b_lr": b[1], "metric": metric, "value": value,
                             "lo": lo, "hi": hi, "a_is": verdict})
    return pd.DataFrame(rows)


def dominated(paired: pd.DataFrame, measure: str = "kl_text") -> pd.DataFrame:
    """From `pairs`' table: for each run (variant, lr), the runs of *other* variants that reach at least its gain
    (more, or within noise) with less drift on `measure` beyond noise — one row per run, `by` empty for a run on
    the frontier (none does). The question a drift-against-gain comparison asks, answered on paired intervals."""
    flipped = paired.rename(columns={"a": "b", "b": "a", "a_lr": "b_lr", "b_lr": "a_lr"}).assign(
        a_is=paired["a_is"].map({"lower": "higher", "higher": "lower", "within noise": "within noise"}))
    both = pd.concat([paired, flipped], ignore_index=True)
    rows = []
    for (variant, lr), mine in both.groupby(["a", "a_lr"], sort=True):
        by = []
        for (other, other_lr), group in mine.groupby(["b", "b_lr"], sort=True):
            verdict = dict(zip(group["metric"], group["a_is"]))
            if other != variant and verdict.get("gain") in ("lower", "within noise") and verdict.get(measure) == "higher":
                by.append(f"{other} at {other_lr:g}")
        rows.append({"variant": variant, "lr": lr, "by": by})
    return pd.DataFrame(rows)


def summarise(results: pd.DataFrame, pooled: dict[tuple[str, str], RunResult], jobs: list[Job] = ()) -> pd.DataFrame:
    """One row per experiment and variant at its chosen learning rate: the seeds pooled (per-block losses averaged,
    so perplexities are geometric means over seeds), forgetting and gain with their 95% intervals over the held-out
    blocks, their spread (max - min) over seeds, the drift measures with theirs, and for a methods variant with a
    control its forgetting net of repair: its general perplexity over its control's (`net_forgetting`)."""
    controls = {e.controls: (e.experiment, e.variant) for e in {j.entry for j in jobs} if e.controls}
    rows = []
    for (experiment, variant), result in pooled.items():
        lr = result.config.train.lr
        part = results[(results["experiment"] == experiment) & (results["variant"] == variant)
                       & np.isclose(results["lr"], lr)]
        first = part.iloc[0]
        row = {"experiment": experiment, "variant": variant, "run": first["run"], "lr": lr,
               "swept": results.loc[(results["experiment"] == experiment) & (results["variant"] == variant),
                                    "lr"].nunique() > 1,
               "part": first["part"], "layers": int(first["layers"]), "params": int(first["params"]),
               "trainable_params": int(first["trainable_params"]), **result.summary(first["part"]),
               "seeds": len(part), "forgetting_spread": part["forgetting"].max() - part["forgetting"].min(),
               "gain_spread": part["gain"].max() - part["gain"].min(),
               "tokens_per_s": part["tokens_per_s"].mean(), "train_seconds": part["train_seconds"].mean()}
        control = pooled.get(controls.get(variant)) if experiment == "methods" else None
        if control is not None:
            row["net_forgetting"], row["net_forgetting_lo"], row["net_forgetting_hi"] = within_noise(
                result, control, "forgetting")
            row["control_lr"] = control.config.train.lr
        rows.append(row)
    return pd.DataFrame(rows)


PAPER = {  # LLaMA Pro (arXiv 2401.02415) ablations and SOLAR (arXiv 2312.15166), as the papers state them
    "retention": "general retention: LoRA > expansion >= full fine-tuning (law domain, general avg: LoRA 58.15, "
                 "+8 blocks 56.70, full 55.01)",
    "retention_drift": "the same ordering, read as drift from the base's own function (KL on its own samples; the "
                       "papers measured benchmarks, not drift)",
    "gain": "domain gain: expansion > full fine-tuning > LoRA (law score: +8 blocks 75.11, full 70.63, LoRA 65.34)",
    "bottom": "blocks at the bottom are the worst placement on both axes: 8 at the bottom collapse (general 29.36, "
              "law 0.81) where interleaved keep 56.70 / 75.11 and the top 56.19 / 60.98",
    "n_blocks": "more blocks: domain score rises to +8 (67.45 at +1 -> 75.11 at +8), general stays within 55.9-56.7",
    "control": "training every 4th original block: no number in the paper (users asked for it)",
    "init": "zero-initialised o_proj/down_proj: the paper argues for it (a zeroed RMSNorm scale would not learn) "
            "but compares no other initialisation",
    "repair": "no claim in the papers: each method trained alike on the base's own kind of text, to tell forgetting "
              "from what any training does to general perplexity",
    "recovery": "SOLAR: dropping m layers at the seam reduces the discrepancy vs stacking and recovers fast in "
                "continued pretraining (no curves or numbers given)",
}
VERDICTS = ("yes", "no", "within noise", "n/a")
DRIFT_ORDER = ("kl_text", "kl_heldout")  # the drift measure claims are read on: the base's samples where there are


def compare(pooled: dict, a: tuple[str, str], b: tuple[str, str], metric: str, relation: str) -> str:
    """Whether a's `metric` is `relation` ("<", "<=", ">") b's: "yes" or "no" when the 95% interval of the paired
    comparison excludes equality, "within noise" when it holds it (a claim holds only beyond noise), "n/a" without
    both. metric: "forgetting", "gain" (ratios against the base) or a drift measure (differences)."""
    ra, rb = pooled.get(a), pooled.get(b)
    if ra is None or rb is None:
        return "n/a"
    if metric in MEASURES:
        if metric not in ra.drift or metric not in rb.drift:
            return "n/a"
        _, lo, hi = drift_difference(ra, rb, metric)
        lo, hi, one = lo, hi, 0.0
    else:
        _, lo, hi = within_noise(ra, rb, metric)
        one = 1.0
    if lo <= one <= hi:  # cannot tell the two apart
        return "within noise"
    return "yes" if (hi < one) == (relation in ("<", "<=")) else "no"


def _combine(verdicts: list[str]) -> str:
    for verdict in ("n/a", "no", "within noise"):
        if verdict in verdicts:
            return verdict
    return "yes"


def drift_measure(row) -> str | None:
    """The drift measure a summary row has, in DRIFT_ORDER (None: not measured)."""
    return next((m for m in DRIFT_ORDER if m in row and pd.notna(row[m])), None)


def check_claims(summary: pd.DataFrame, pooled: dict | None = None) -> pd.DataFrame:
    """Each paper claim beside what we measured and whether it holds here: "yes", "no", "within noise" (the 95%
    interval of a paired comparison it rests on holds equality), or "n/a" where the paper states no ordering.
    Without `pooled` (per-block losses) the verdicts use the point estimates."""
    def get(experiment: str, prefix: str) -> pd.Series | None:
        rows = summary[(summary["experiment"] == experiment) & summary["variant"].str.startswith(prefix)]
        return rows.iloc[0] if len(rows) else None

    def key(row) -> tuple[str, str]:
        return row["experiment"], row["variant"]

    def holds(a, b, metric: str, relation: str) -> str:
        if pooled:
            return compare(pooled, key(a), key(b), metric, relation)
        x, y = a[metric], b[metric]
        return "yes" if {"<": x < y, "<=": x <= y, ">": x > y}[relation] else "no"

    rows = []

    def claim(name: str, measured: str, verdict: str) -> None:
        rows.append({"claim": name, "paper": PAPER[name], "measured": measured, "holds_here": verdict})

    def interval(row, metric: str, digits: int = 2) -> str:
        lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
        return "" if lo is None or pd.isna(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"

    pro, full, lora = get("methods", "llama-pro"), get("methods", "full"), get("methods", "lora")
    if pro is not None and full is not None and lora is not None:
        named = (("LoRA", lora), ("expansion", pro), ("full", full))
        claim("retention", "general perplexity x " + ", ".join(f"{k} {v['forgetting']:.3f}"
                                                               f"{interval(v, 'forgetting', 3)}" for k, v in named),
              _combine([holds(lora, pro, "forgetting", "<"), holds(pro, full, "forgetting", "<=")]))
        kl = drift_measure(pro)
        if kl is not None and all(drift_measure(v) == kl for _, v in named):
            claim("retention_drift", f"{kl} (nats per token) " + ", ".join(
                f"{k} {v[kl]:.4f}{interval(v, kl, 4)}" for k, v in named),
                  _combine([holds(lora, pro, kl, "<"), holds(pro, full, kl, "<=")]))
        claim("gain", "domain perplexity / " + ", ".join(f"{k} {v['gain']:.3f}{interval(v, 'gain', 3)}"
                                                         for k, v in named),
              _combine([holds(pro, full, "gain", ">"), holds(full, lora, "gain", ">")]))
    control = get("methods", "every")
    if pro is not None and control is not None:
        claim("control", f"{control['variant']}: general x{control['forgetting']:.3f}, domain /{control['gain']:.3f} "
                         f"({control['trainable_params']:,} trainable) vs llama-pro x{pro['forgetting']:.3f}, "
                         f"/{pro['gain']:.3f} ({pro['trainable_params']:,} trainable)", "n/a")
    inter, top, bottom = get("placement", "interleave"), get("placement", "top"), get("placement", "bottom")
    if inter is not None and top is not None and bottom is not None:
        claim("bottom", "general x / domain /: " + ", ".join(f"{v['variant']} {v['forgetting']:.2f} / {v['gain']:.2f}"
                                                                for v in (inter, top, bottom)),
              _combine([holds(bottom, other, metric, relation) for other in (inter, top)
                        for metric, relation in (("gain", "<"), ("forgetting", ">"))]))
    counts = summary[summary["experiment"] == "n_blocks"]
    if len(counts) > 1:
        first, last = counts.iloc[0], counts.iloc[-1]
        flat = counts["forgetting"].max() <= 1.1 * counts["forgetting"].min()  # general flat: within 10%
        claim("n_blocks", "domain perplexity / by blocks added: " + ", ".join(
            f"{v} {g:.2f}" for v, g in zip(counts["variant"], counts["gain"])) + "; general x: " + ", ".join(
            f"{f:.2f}" for f in counts["forgetting"]),
              _combine([holds(last, first, "gain", ">"), "yes" if flat else "no"]))
    inits = summary[summary["experiment"] == "init"]
    if len(inits):
        claim("init", "general x / domain / by initialisation: " + ", ".join(
            f"{v['variant']} {v['forgetting']:.2f} / {v['gain']:.2f}" for _, v in inits.iterrows()), "n/a")
    if "net_forgetting" in summary:
        net = summary[summary["net_forgetting"].notna()]
        if len(net):
            claim("repair", "general perplexity after code / after the same training on general text: " + ", ".join(
                f"{v['variant']} x{v['net_forgetting']:.3f}{interval(v, 'net_forgetting', 3)}"
                for _, v in net.iterrows()), "n/a")
    rec = summary[summary["experiment"] == "recovery"]
    dus_row, stack_row = get("recovery", "DUS"), get("recovery", "stack")
    if dus_row is not None and stack_row is not None:
        claim("recovery", "general perplexity at step 0 -> end: " + ", ".join(
            f"{v['variant']} {v['general_ppl_start']:.1f} -> {v['general_ppl_end']:.1f}" for _, v in rec.iterrows()),
              "yes" if dus_row["general_ppl_start"] < stack_row["general_ppl_start"]
              and dus_row["general_ppl_end"] <= stack_row["general_ppl_end"] * 1.02 else "no")
    return pd.DataFrame(rows, columns=["claim", "paper", "measured", "holds_here"])


def figures(results: pd.DataFrame, summary: pd.DataFrame, prefix: str, out: str | Path | None = None) -> list[Path]:
    """The experiments as figures: gain against forgetting per experiment (each variant's pooled value with its 95%
    interval; upper left is better), and the held-out curves of the methods and of the recovery. Returns the paths."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    paths = []
    panels = [e for e in ("methods", "placement", "n_blocks", "init") if e in set(summary["experiment"])]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False,
                                 layout="constrained")
        for i, (ax, experiment) in enumerate(zip(axes[0], panels)):
            part = summary[summary["experiment"] == experiment]
            colors = sns.color_palette("tab10", len(part))
            for color, (_, row) in zip(colors, part.iterrows()):
                xerr = [[row["forgetting"] - row.get("forgetting_lo", row["forgetting"])],
                        [row.get("forgetting_hi", row["forgetting"]) - row["forgetting"]]]
                yerr = [[row["gain"] - row.get("gain_lo", row["gain"])], [row.get("gain_hi", row["gain"]) - row["gain"]]]
                ax.errorbar(row["forgetting"], row["gain"], xerr=xerr, yerr=yerr, fmt="o", ms=7, color=color,
                            capsize=3, label=row["variant"])
            if part["gain"].max() > 4 * part["gain"].min():
                ax.set_yscale("log")
            if part["forgetting"].max() > 4 * part["forgetting"].min():  # e.g. a run that diverged: log, so the
                ax.set_xscale("log")  # others are not squashed into one point
            ax.set(xlabel="forgetting: general ppl end / base", ylabel="gain: domain ppl base / end" if i == 0 else "",
                   title=experiment)
            ax.legend(fontsize=8, loc="best", framealpha=0.8)
        fig.suptitle("Domain gain against general forgetting (upper left is better; bars: 95% intervals)")
        paths.append(plots.save(fig, f"{prefix}_forgetting_vs_gain", out))
        plt.close(fig)
    chosen = results.merge(summary[["experiment", "variant", "lr"]], on=["experiment", "variant", "lr"])
    curves = []
    for _, row in chosen.iterrows():
        for r in read_metrics(REPO / row["folder"]):  # a relative folder is the repository's; an absolute one stays
            if "ppl_general" in r:
                curves.append({"experiment": row["experiment"], "variant": row["variant"], "seed": row["seed"],
                               "tokens": r["tokens"], "general": r["ppl_general"], "domain": r["ppl_domain"]})
    curves = pd.DataFrame(curves)
    for experiment, metrics in (("methods", ("general", "domain")), ("recovery", ("general",))):
        part = curves[curves["experiment"] == experiment] if len(curves) else curves
        if not len(part):
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False,
                                 layout="constrained")
        for ax, metric in zip(axes[0], metrics):
            sns.lineplot(data=part, x="tokens", y=metric, hue="variant", marker="o", errorbar=("pi", 100), ax=ax)
            ax.set(yscale="log", ylabel=f"held-out {metric} perplexity", xlabel="training tokens",
                   title=f"{experiment}: {metric} text")
            ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k" if x else "0")
            ax.legend(fontsize=8, title=None)
        paths.append(plots.save(fig, f"{prefix}_{experiment}_curves", out))
        plt.close(fig)
    drift = drift_figure(results, summary, prefix, out)
    return paths + ([drift] if drift else [])



def drift_figure(results: pd.DataFrame, summary: pd.DataFrame, prefix: str, out: str | Path | None = None) -> Path | None:
    """The methods' domain gain against each drift measure they have (deepen.forgetting), every run at every rate
    it was trained at (a line joins a method's rates; filled: the rate chosen on validation): x the drift from the
    base (0: the base's own function; right is worse), y the gain, each with its 95% interval. A method that
    reaches a gain with less drift than another sits up and to the left of it. None without drift."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    runs = results[results["experiment"] == "methods"]
    measures = [m for m in MEASURES if m in runs and runs[m].notna().any()]
    if not measures or not len(runs):
        return None
    chosen = summary[summary["experiment"] == "methods"].set_index("variant")["lr"]
    variants = list(dict.fromkeys(runs["variant"]))
    colors = dict(zip(variants, sns.color_palette("tab10", len(variants))))
    fig, axes = plt.subplots(1, len(measures), figsize=(4.6 * len(measures), 4.4), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], measures):
        for variant in variants:
            part = runs[runs["variant"] == variant].groupby("lr", as_index=False).mean(numeric_only=True)
            ax.plot(part[name], part["gain"], "-", color=colors[variant], lw=1, alpha=0.6)
            for _, row in part.iterrows():
                picked = variant in chosen and np.isclose(row["lr"], chosen[variant])
                ax.errorbar(row[name], row["gain"], xerr=[[row[name] - row[f"{name}_lo"]], [row[f"{name}_hi"] - row[name]]],
                            yerr=[[row["gain"] - row["gain_lo"]], [row["gain_hi"] - row["gain"]]], fmt="o", ms=7,
                            capsize=2, color=colors[variant], mfc=colors[variant] if picked else "white",
                            label=variant if picked else None)
                ax.annotate(f"{row['lr']:g}", (row[name], row["gain"]), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color=colors[variant])
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set(xlabel=f"{name} (nats per token)", ylabel="gain: domain ppl base / end", title=name)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle("Gain against drift from the base, each method at each learning rate (filled: the rate chosen); "
                 "up and left is better; bars: 95% intervals")
    path = plots.save(fig, f"{prefix}_drift_vs_gain", out)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rung", default="tiny", choices=RUNGS, help="tiny (a few-million-parameter base) or smol "
                                                                      "(SmolLM2-135M-Instruct)")
    profiles = sorted({p for _, p in PROFILES})
    parser.add_argument("--profile", choices=profiles,
                        help="what to run where (default: gpu when CUDA is present, else cpu): " + "; ".join(
                            f"{r} {p}: {PROFILES[r, p].shows}" for r, p in PROFILES if (r, p) != ("tiny", "gpu")))
    parser.add_argument("--seeds", type=int, help="seeds per run (default: the profile's)")
    parser.add_argument("--jobs", type=int, help="runs at once, one process each (default: the profile's, 2 on a CPU "
                                                 "and 1 on a GPU)")
    parser.add_argument("--experiments", help=f"comma list of {', '.join(EXPERIMENTS)} (default: the profile's)")
    parser.add_argument("--sweep", help="learning rates for every run, e.g. lr=1e-4,3e-4,1e-3: each variant's rate is "
                                        "chosen on the validation half of the held-out blocks, reported on the test "
                                        "half; \"\" for none (default: the profile's rates)")
    parser.add_argument("--card", help=f"--dry-run: plan for this card ({', '.join(MEASURED)}; default: the "
                                       "profile's)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their planned time; train nothing")
    parser.add_argument("--tables-only", action="store_true", help="rebuild the CSVs and figures from the run folders "
                                                                    "as they are; train and measure nothing")
    parser.add_argument("--root", help="folder of the runs (default runs/reproduce/<rung>[-<profile>])")
    parser.add_argument("--out", help="folder for the CSVs and figures (default figures/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run, e.g. train.steps=20")


def dry_run(rung: str, profile: str, overrides=(), seeds: int | None = None, experiments=None, sweep=None,
            card: str | None = None, jobs: int | None = None) -> tuple[list[Job], float | None]:
    """(the jobs a reproduction would train, their planned seconds on `card`): controls counted once per seed at
    one rate, as they will run; None where the card has no measured throughput."""
    p = profile_of(rung, profile)
    changes = changes_of(list(overrides))
    base = rung_config(rung, profile, changes)
    chosen = experiments or p.experiments
    unknown = set(chosen) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    entries = [e for e in plan_runs(rung, profile, changes) if e.experiment in chosen]
    seeds = p.seeds if seeds is None else seeds
    rates = parse_sweep(sweep) if sweep is not None else p.rates
    root = runs_root(rung, profile)
    todo = jobs_of([e for e in entries if e.controls is None], seeds, rates, root, base) + jobs_of(
        [e for e in entries if e.controls is not None], seeds, None, root, base)
    distinct = list({j.folder: j for j in todo}.values())
    return distinct, planned_seconds([j.config for j in distinct], card or p.card, p.jobs if jobs is None else jobs)


def main(args: argparse.Namespace) -> int:
    import torch

    start = time.perf_counter()
    gpu = torch.accelerator.is_available()
    profile = args.profile or ("gpu" if gpu else "cpu")
    experiments = tuple(args.experiments.split(",")) if args.experiments else None
    if args.card is not None and args.card not in MEASURED:
        raise ValueError(f"--card {args.card!r}: throughput is measured for {', '.join(MEASURED)}")
    if args.dry_run:
        p = profile_of(args.rung, profile)
        todo, seconds = dry_run(args.rung, profile, args.overrides, args.seeds, experiments, args.sweep, args.card,
                                args.jobs)
        swept = bool(parse_sweep(args.sweep) if args.sweep is not None else p.rates)
        for job in todo:
            if job.entry.controls is not None and swept:  # its rate (and so its folder's key) is chosen later
                print(f"{job.entry.run.name}-s{job.seed}: at the rate chosen for {job.entry.controls}")
            else:
                print(job.folder.name)
        config = todo[0].config
        t = config.train
        card = args.card or p.card
        m = MEASURED.get(card)
        print(f"{len(todo)} runs of {t.steps * t.global_batch * config.data.seq_len:,} tokens each "
              f"({', '.join(experiments or p.experiments)}; seeds {args.seeds or p.seeds}). It shows {p.shows}.")
        if seconds is None:
            print(f"planned time: no throughput measured on {card} for this rung")
        else:
            jobs = args.jobs or p.jobs
            print(f"planned on {m.card}, {jobs} run{'s' if jobs > 1 else ''} at a time: {duration(seconds)} "
                  f"({seconds / 60:.1f} minutes), from the tokens/s measured there on {m.date} ({m.setup}) scaled "
                  f"by each run's FLOPs, plus {m.overhead_s:.0f} s per run")
        return 0
    threads = None if gpu else 1  # CPU: one thread per process is fastest here
    results = run(args.rung, profile, args.seeds, args.jobs, args.overrides, args.root, experiments, args.sweep,
                  threads=threads, out=args.out, train_runs=not args.tables_only)

    out = Path(args.out) if args.out else plots.figures_dir()
    prefix = results_prefix(args.rung, profile)
    summary = pd.read_csv(out / f"{prefix}_summary.csv")
    cols = [c for c in ["experiment", "variant", "lr", "trainable_params", "general_ppl_end", "domain_ppl_end",
                        "forgetting", "gain", "net_forgetting", *MEASURES] if c in summary]
    with pd.option_context("display.width", 220, "display.max_colwidth", 40):
        print(summary[cols].round(4).to_string(index=False))
        print()
        for _, row in pd.read_csv(out / f"{prefix}_claims.csv", keep_default_na=False).iterrows():
            print(f"[{row['holds_here']:>12}] {row['paper']}\n      measured: {row['measured']}")
    print(f"\n{results['folder'].nunique()} runs; results in {out}/{prefix}_*.csv and .png "
          f"({time.perf_counter() - start:.0f} s)")
    return 0
