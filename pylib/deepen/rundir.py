"""A run folder, what `deepen train` writes into `out`:

    config.yaml        the run's config (a rerun with another config is refused)
    metrics.jsonl      one record per step: loss, lr, tokens, tokens/s; held-out perplexities when evaluated
    evaluations.jsonl  each evaluation's loss per held-out block (and the base's), for confidence intervals
    checkpoints/       step-N: the training state to resume from (the last two complete ones are kept, each file
                       with its size and CRC-32, so a damaged last one falls back to the one before)
    model/             the trained model (from_pretrained loads it), written at the end

`Checkpointer` saves and resumes the training state without pickle: tensors in safetensors, one file per process
with the shards it holds (one process, DDP and FSDP2 alike), everything else in JSON — so a run folder that was
shared or copied cannot run code when it is resumed. Only what training changes is saved: the trainable
parameters, the optimizer's state, the schedule, the random states and the data position; frozen weights are
loaded again from the model's source, exactly as they were.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
EVALUATIONS = "evaluations.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "model"
STATE = "state.json"


def read_metrics(folder: str | os.PathLike, name: str = METRICS) -> list[dict]:
    """The records of a run folder's metrics.jsonl (or evaluations.jsonl), one per logged step (a partly written
    line of a run in progress is skipped); those with "ppl_general" are the held-out evaluations."""
    records = []
    path = Path(folder, name)
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends records to a run's metrics.jsonl (or another log, `name`; on the main process only); opened at
    `start`, it keeps the records up to that step (those a killed run logged past its last checkpoint are dropped:
    they are redone)."""

    def __init__(self, folder: Path, start: int, main: bool = True, name: str = METRICS):
        self.path, self.main = Path(folder, name), main
        if main:
            kept = [r for r in read_metrics(folder, name) if start and r["step"] <= start]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def __call__(self, record: dict) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this process holds: a DTensor's local shard (FSDP2), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A loaded local shard as `param` holds its state: a DTensor on the param's mesh when the param is one."""
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value.to(_local(param).device), param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


KEEP = 2  # complete checkpoints kept: the newest, and the one before it in case the newest is found damaged


def file_check(path: Path) -> dict:
    """A file's size and CRC-32 (read in 16 MiB pieces): what a checkpoint records of each file it writes."""
    crc = 0
    with open(path, "rb") as f:
        while piece := f.read(16 * 2**20):
            crc = zlib.crc32(piece, crc)
    return {"bytes": path.stat().st_size, "crc32": crc}


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a saved checkpoint folder, in a few words naming the file, or None if it is whole: its
    state.json reads and its step is the folder's; every process's JSON reads and its safetensors file has the
    size and CRC-32 recorded when it was written, and opens."""
    from safetensors import safe_open

    try:
        state = json.loads((checkpoint / STATE).read_text())
        step, processes = int(state["step"]), int(state["processes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{checkpoint / STATE} cannot be read ({type(e).__name__})"
    if checkpoint.name != f"step-{step:07d}":
        return f"{checkpoint / STATE} says step {step}, not the folder's"
    for rank in range(processes):
        meta_path, tensors = checkpoint / f"rank-{rank:05d}.json", checkpoint / f"rank-{rank:05d}.safetensors"
        try:
            recorded = json.loads(meta_path.read_text()).get("file")
        except (OSError, ValueError) as e:
            return f"{meta_path} cannot be read ({type(e).__name__})"
        if not tensors.is_file():
            return f"{tensors} is missing"
        if recorded is not None and file_check(tensors) != recorded:
            return f"{tensors} is not the file that was written (its size or CRC-32 differs: truncated or corrupted)"
        try:
            with safe_open(tensors, "pt"):
                pass
        except Exception as e:  # noqa: BLE001 — safetensors raises its own error types for a bad header
            return f"{tensors} does not open ({type(e).__name__})"
    return None


class Checkpointer:
    """Save and resume a run's training state in `folder` (out/checkpoints): step-N folders written whole into
    .step-N.partial and renamed; the last KEEP complete ones kept. On resume the newest whole one is used: a damaged
    newest one (`damage`) is reported in one line and the one before it is used instead. Every process calls `save`
    and `load`."""

    def __init__(self, folder: str | os.PathLike, accelerator, model, optimizer, schedule):
        from accelerate.utils import DistributedType

        self.folder, self.accelerator = Path(folder), accelerator
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        # DeepSpeed partitions parameters and optimizer state its own way: its engine saves and loads them (in its
        # own, pickled format: resume only run folders you made), the rest is deepen's
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def saved(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        return sorted(self.folder.glob("step-*[0-9]")) if self.folder.is_dir() else []

    def last(self) -> Path | None:
        done = self.saved()
        return done[-1] if done else None

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]  # state_dict's numbering

    def save(self, step: int, state: dict, local: tuple[dict, dict] = ({}, {})) -> Path:
        """Write step-`step` with `state` (JSON: the step's tokens, ...) beside the tensors; `local` is this
        process's own (JSON, tensors) — the position of the data streams it reads."""
        final = self.folder / f"step-{step:07d}"
        tmp = self.folder / f".step-{step:07d}.partial"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if self.deepspeed:
            self.accelerator.save_state(str(tmp / "deepspeed"))
        tensors = {} if self.deepspeed else {f"model/{name}": _local(p.detach()) for name, p in self._trainable().items()}
        optimizer = {"state": {}, "param_groups": []} if self.deepspeed else self.optimizer.state_dict()
        kinds = {}  # which optimizer state entries are tensors, and which of those DTensors (re-made on load)
        for i, entries in optimizer["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"optim/{i}/{key}"] = _local(value)
                    kinds[f"{i}/{key}"] = "dtensor" if hasattr(value, "to_local") else "tensor"
                else:
                    kinds[f"{i}/{key}"] = value  # a plain number: kept in the JSON
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for d, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{d}"] = s
        numpy_state = np.random.get_state()
        tensors["rng/numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
        tensors.update({f"data/{k}": v for k, v in local[1].items()})
        tensor_file = tmp / f"rank-{self.rank:05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tensor_file)
        (tmp / f"rank-{self.rank:05d}.json").write_text(json.dumps({
            "optimizer_state": kinds, "python_random": _jsonable(random.getstate()),
            "numpy_random": [numpy_state[0], *numpy_state[2:]], "data": local[0], "file": file_check(tensor_file)}))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            groups = [{**g, "betas": list(g["betas"])} if "betas" in g else g for g in optimizer["param_groups"]]
            (tmp / STATE).write_text(json.dumps({"step": step, **state, "processes": self.world,
                                                 "param_groups": groups, "schedule": self.schedule.state_dict()},
                                                indent=1))
            if final.exists():  # a damaged one this run resumed from before: replaced by the new one
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.saved()[:-KEEP]:  # the newest KEEP stay: a damaged newest one has one to fall back to
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def load(self) -> dict | None:
        """Restore the last checkpoint, if any: returns its state (step, tokens, ...; "local": this process's own
        (JSON, tensors), as `save` got them) or None."""
        for stale in self.folder.glob(".step-*.partial") if self.accelerator.is_main_process else ():
            shutil.rmtree(stale, ignore_errors=True)  # a checkpoint a killed run did not finish writing
        last = self._whole()
        if last is None:
            return None
        state = json.loads((last / STATE).read_text())
        if state["processes"] != self.world:
            raise ValueError(f"{last} was saved by {state['processes']} processes; resume it with as many "
                             f"(now {self.world}), or start a new run in another out folder")
        tensors = load_file(last / f"rank-{self.rank:05d}.safetensors")
        meta = json.loads((last / f"rank-{self.rank:05d}.json").read_text())
        if self.deepspeed:
            self.accelerator.load_state(str(last / "deepspeed"))
            return self._restore_rest(state, tensors, meta)
        trainable = self._trainable()
        saved = {k.removeprefix("model/") for k in tensors if k.startswith("model/")}
        if saved != set(trainable):
            raise ValueError(f"{last} holds other trainable parameters than this run trains "
                             f"({len(saved)} saved, {len(trainable)} now); start a new run in another out folder")
        with torch.no_grad():
            for name, p in trainable.items():
                _local(p).copy_(tensors[f"model/{name}"])
        params = self._params()
        entries: dict[int, dict] = {}
        for key, kind in meta["optimizer_state"].items():
            i, name = key.split("/", 1)
            value = tensors[f"optim/{key}"] if kind in ("tensor", "dtensor") else kind
            entries.setdefault(int(i), {})[name] = _like(value, params[int(i)]) if kind == "dtensor" else value
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
        self.optimizer.load_state_dict({"state": entries, "param_groups": groups})
        return self._restore_rest(state, tensors, meta)

    def _whole(self) -> Path | None:
        """The newest checkpoint that is whole (checked by the main process, its answer shared), saying in one line
        which newer ones are damaged; None when there is none; an error naming the damage when all are."""
        from accelerate.utils import broadcast_object_list

        answer = [None, []]
        if self.accelerator.is_main_process:
            for checkpoint in reversed(self.saved()):
                problem = damage(checkpoint)
                if problem is None:
                    answer[0] = str(checkpoint)
                    break
                answer[1].append(problem)
        if self.world > 1:
            broadcast_object_list(answer)
        chosen, problems = answer
        if problems and chosen is None:
            raise ValueError(f"no checkpoint in {self.folder} can be resumed from: {'; '.join(problems)}. Start the "
                             f"run over with --restart (in Python: train(config, restart=True)), or remove "
                             f"{self.folder.parent}")
        if problems and self.accelerator.is_main_process:
            print(f"resuming from {Path(chosen).name}: the newer checkpoint is damaged ({problems[0]}); it is removed",
                  flush=True)
            for damaged in self.saved()[self.saved().index(Path(chosen)) + 1:]:
                shutil.rmtree(damaged)  # so that the two kept are whole ones, and none is named as good
        if self.world > 1:
            self.accelerator.wait_for_everyone()
        return None if chosen is None else Path(chosen)

    def _restore_rest(self, state: dict, tensors: dict, meta: dict) -> dict:
        """The schedule, the random states and this process's data position."""
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(tensors["rng/torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[f"rng/cuda/{d}"] for d in range(torch.cuda.device_count())
                                          if f"rng/cuda/{d}" in tensors])
        version, keys, gauss = meta["python_random"]
        random.setstate((version, tuple(keys), gauss))
        name, *rest = meta["numpy_random"]
        np.random.set_state((name, tensors["rng/numpy"].numpy().astype(np.uint32), *rest))
        local = {k.removeprefix("data/"): v for k, v in tensors.items() if k.startswith("data/")}
        return {**state, "local": (meta.get("data", {}), local)}


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value
