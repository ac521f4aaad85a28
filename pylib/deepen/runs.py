"""Read a run folder (deepen.rundir) as a result — and the one definition of forgetting and gain.

    forgetting = general perplexity at the end / the base's     (1.0: nothing forgotten; higher: worse)
    gain       = the base's domain perplexity / at the end      (1.0: nothing learnt; higher: better)

"The base" is the model before it was grown: for a plan that keeps the function (LLaMA Pro) and for no plan,
the run's own step 0; for a plan that changes it (SOLAR's DUS, stacking), the base measured before growing, so
the damage the growth did counts against the run. Every caller — the CLI, the demo, `deepen reproduce`, the
results explorer, the notebooks — reads runs through `RunResult`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from deepen.rundir import CONFIG, FINAL, METRICS, read_metrics


@dataclass
class RunResult:
    folder: Path
    config: dict  # config.yaml as the run saved it
    records: list[dict]  # metrics.jsonl

    @classmethod
    def read(cls, folder: str | os.PathLike) -> RunResult:
        folder = Path(folder)
        if not (folder / METRICS).is_file():
            raise FileNotFoundError(f"{folder} is not a run folder: it has no {METRICS} (written by `deepen train`)")
        config = folder / CONFIG
        return cls(folder, (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}, read_metrics(folder))

    @property
    def evaluations(self) -> list[dict]:
        """The records with held-out perplexities: step 0, every eval_every steps, the end."""
        return [r for r in self.records if "ppl_general" in r]

    @property
    def first(self) -> dict:
        return self.evaluations[0]

    @property
    def last(self) -> dict:
        return self.evaluations[-1]

    @property
    def finished(self) -> bool:
        return (self.folder / FINAL / "config.json").is_file()

    @property
    def base_measured(self) -> bool:
        """Whether the base's perplexities are known (else forgetting and gain are against step 0: a model grown
        on disk by a plan that changes the function, whose base could not be loaded)."""
        return "base_ppl_general" in self.first

    @property
    def base_general(self) -> float:
        return self.first.get("base_ppl_general", self.first["ppl_general"])

    @property
    def base_domain(self) -> float:
        return self.first.get("base_ppl_domain", self.first["ppl_domain"])

    @property
    def forgetting(self) -> float:
        return self.last["ppl_general"] / self.base_general

    @property
    def gain(self) -> float:
        return self.base_domain / self.last["ppl_domain"]

    @property
    def steps(self) -> int:
        return self.records[-1]["step"]

    @property
    def tokens(self) -> int:
        return self.records[-1]["tokens"]

    @property
    def _steps(self) -> list[dict]:
        return [r for r in self.records if "tokens_per_s" in r]

    @property
    def final_loss(self) -> float:
        steps = self._steps
        return steps[-1]["loss"] if steps else math.nan

    @property
    def tokens_per_s(self) -> float:
        """The mean of each step's tokens / its seconds (evaluation not counted)."""
        steps = self._steps
        return sum(r["tokens_per_s"] for r in steps) / len(steps) if steps else math.nan

    @property
    def train_seconds(self) -> float:
        steps = self._steps
        per_step = {r["step"]: r for r in steps}
        tokens = {r["step"]: r["tokens"] for r in self.records}
        return sum((r["tokens"] - tokens.get(s - 1, 0)) / r["tokens_per_s"] for s, r in per_step.items())

    def summary(self) -> dict:
        """The numbers a table shows: base, start and end perplexities, forgetting and gain."""
        return {"steps": self.steps, "tokens": self.tokens,
                "general_ppl_base": self.base_general, "general_ppl_start": self.first["ppl_general"],
                "general_ppl_end": self.last["ppl_general"], "domain_ppl_base": self.base_domain,
                "domain_ppl_start": self.first["ppl_domain"], "domain_ppl_end": self.last["ppl_domain"],
                "forgetting": self.forgetting, "gain": self.gain, "base_measured": self.base_measured}

    def line(self) -> str:
        """One line for a terminal: perplexities from the base to the end, forgetting and gain."""
        against = "the base" if self.base_measured else "step 0 (the base was not measured)"
        return (f"held-out perplexity, base -> step {self.last['step']}: general {self.base_general:.2f} -> "
                f"{self.last['ppl_general']:.2f} (forgetting x{self.forgetting:.2f}), domain {self.base_domain:.2f} -> "
                f"{self.last['ppl_domain']:.2f} (gain /{self.gain:.2f}), against {against}")


def find_runs(root: str | os.PathLike) -> list[RunResult]:
    """Every run folder under `root` (root itself included), in path order; folders with no records skipped."""
    root = Path(root)
    runs = [RunResult.read(path.parent) for path in sorted(root.rglob(METRICS))]
    return [run for run in runs if run.evaluations]
