"""DPO after instruction tuning, and SOLAR's stepwise DPO (sDPO, arXiv 2312.15166 / 2403.19270): the preference
pairs split into K chunks used one after another, stage k trained from stage k−1's result with that result as its
reference — the reference improves as the model does. Each stage is an ordinary run of `deepen train` with
objective dpo (deepen.objectives), in OUT/stage-k; one stage is plain DPO, in OUT itself.

    deepen dpo --config configs/tiny-dpo.yaml [--stages K] [--method full|llama-pro|lora] [key=value ...]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from deepen.config import RunConfig, check, stage_span
from deepen.runs import RunResult
from deepen.train import train


def stage_folders(out: str | Path, stages: int) -> list[Path]:
    """The run folders of a DPO (one: OUT) or an sDPO run (OUT/stage-1 ... OUT/stage-K)."""
    out = Path(out)
    return [out] if stages == 1 else [out / f"stage-{k + 1}" for k in range(stages)]


def run_dpo(config: RunConfig, stages: int | None = None, *, progress: bool = True, allow_change=(),
            restart: bool = False) -> Path:
    """Train DPO (stages 1) or sDPO (stages K: config.train.steps and the pairs split over the K stages, shares
    differing by at most one, so both see the same pairs for the same number of steps); returns the last stage's
    model folder. Rerunning resumes; `allow_change` and `restart` as for `train` (each stage's)."""
    stages = stages or config.dpo.stages
    config = check(dataclasses.replace(config, objective="dpo", dpo=dataclasses.replace(config.dpo, stages=stages,
                                                                                        stage=0)))
    if config.train.steps < stages:
        raise ValueError(f"train.steps={config.train.steps} cannot be split over {stages} sDPO stages")
    model, grow = config.model, config.grow
    for k, folder in enumerate(stage_folders(config.out, stages)):
        begin, end = stage_span(config.train.steps, stages, k)
        stage = dataclasses.replace(
            config, model=model, grow=grow if k == 0 else None, out=str(folder),
            dpo=dataclasses.replace(config.dpo, stage=k),
            train=dataclasses.replace(config.train, steps=end - begin))
        if progress and stages > 1:
            print(f"sDPO stage {k + 1} of {stages}: the reference is {model}", flush=True)
        model = str(train(stage, progress=progress, allow_change=allow_change, restart=restart))
    return Path(model)


def stage_results(out: str | Path, stages: int) -> list[RunResult]:
    return [RunResult.read(folder) for folder in stage_folders(out, stages)]
