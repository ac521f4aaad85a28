"""The run: `train(config)` trains a run config (deepen.config) on accelerate, from one CPU process to FSDP2 on many
GPUs, and writes a run folder (deepen.rundir). `deepen train --config configs/tiny-cpu.yaml`.

    build the model (grown by its plan) -> choose what learns -> the data -> optimizer -> resume?
    -> loop: train_step, log, evaluate, checkpoint -> save the model

Methods: llama-pro (only the manifest's new blocks learn), full, lora (peft), blocks (only the listed original
layers); a run with `architecture:` pretrains a new model from scratch (how the tiny base is made). The global
batch stays the config's whatever the process count (gradient accumulation). Rerunning the same command resumes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from filelock import FileLock
from tqdm.auto import tqdm

from deepen.config import AUTO, RECIPES, RunConfig, batch_layout, check, from_dict, recipe
from deepen.data import revisions, tiny_tokenizer
from deepen.grow import BranchMasks, grow, preserves_function
from deepen.loop import NonFiniteLoss, compile_layers, optimizer_and_schedule, precision_on, train_step
from deepen.manifest import FolderBusy, Manifest, atomic_folder, one_writer
from deepen.models import resolve
from deepen.objectives import objective
from deepen.rundir import CHECKPOINTS, CONFIG, EVALUATIONS, FINAL, METRICS, Checkpointer, MetricsLog
from deepen.trainable import hold_frozen_in_bf16, select_trainable, trained_layers, widened_to_fp32

# Keys a resumed run may change when asked to (train(allow_change=...), `deepen train --allow-change KEY`).
CHANGEABLE_ON_RESUME = ("train.lr", "train.clip", "train.eval_every", "train.save_every")


# ---------------------------------------------------------------------------------------------- the model's source

def model_folder(name: str, progress: bool = True) -> str:
    """A run's `model` as a folder or hub id. A model made here ("tiny-base", deepen.config.recipe) is trained
    first if it is not in the cache yet: once, in a process of its own (one CPU thread, so that parallel test
    workers and torchrun ranks do not crowd each other), under a file lock."""
    made = recipe(name)
    if made is None:
        return resolve(name)
    final = Path(made.out) / FINAL
    if not (final / "config.json").is_file():
        final.parent.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(made.out) + ".lock"):
            if not (final / "config.json").is_file():
                _train_in_a_process(name, made, progress)
    return str(final)


def _train_in_a_process(name: str, made: RunConfig, progress: bool) -> None:
    preset = RECIPES[name.lower()]
    if progress:
        print(f"{name}: training it once from {preset} (a few minutes), cached in {made.out}", flush=True)
    distributed = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    env = {k: v for k, v in os.environ.items() if k not in distributed and not k.startswith("FSDP_")}
    done = subprocess.run([sys.executable, "-m", "deepen", "train", "--config", preset, f"out={made.out}"],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training {name} failed:\n{(done.stderr or done.stdout).strip()[-1500:]}")


def tiny_base():
    """(model, tokenizer): the tiny rung's base, a small Llama that knows some English (configs/tiny-base.yaml),
    trained on first use (minutes), then cached. A transformers LlamaForCausalLM in eval mode; its run folder's
    metrics.jsonl (`Path(model.name_or_path).parent`) holds its training losses and held-out perplexity."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = model_folder("tiny-base")
    return LlamaForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def build_model(config: RunConfig, path: str | None, before_growing=None):
    """(model, manifest or None): the run's model in fp32, ready to learn — a new one of `architecture` (seeded by
    the caller), or the one at `path` grown by the run's plan (the manifest then records it; a folder made by
    `deepen expand` brings its own); LoRA adapters added; requires_grad set by the method (`select_trainable`).
    before_growing(model, plan) runs before a plan is applied (training scores the base there)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if config.architecture is not None:
        model, manifest = LlamaForCausalLM(config.architecture.to_hf()), None
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        plan = config.plan(model.config.num_hidden_layers)
        if plan is None:
            manifest = Manifest.find(path)
        else:
            if before_growing is not None:
                before_growing(model, plan)
            init = config.grow.init
            model = grow(model, plan, init="copy" if init == "masked" else init)
            manifest = Manifest(base=config.model, plan=plan, extra={} if init == "plan" else {"init": init})
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha,
                                                 lora_dropout=config.lora.dropout, target_modules=config.lora.targets))
    select_trainable(model, config.method, trained_layers(config, manifest.new_layers if manifest else []),
                     config.also_train)
    return model, manifest


# ---------------------------------------------------------------------------------------------- the run


def _refuse_another_config(out: Path, config: RunConfig, allow_change) -> dict:
    """The changes a resumed run makes to its saved config ({key: (then, now)}), refusing any not allowed."""
    saved = out / CONFIG
    if not saved.is_file():
        return {}
    try:
        then = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{saved} is damaged ({e}); remove the run folder {out} or choose another out") from None
    if not isinstance(then, dict):
        raise ValueError(f"{saved} is not a run's config; remove the run folder {out} or choose another out")
    try:  # a run begun before a key was added to the schema: that key is the default it trained with
        then = from_dict(then).to_dict()
    except ValueError:
        pass  # a key this version does not know: compared as written, and reported below
    # out may be named another way (relative, absolute, a moved folder): the folder itself is the run
    diff = _config_diff({**then, "out": None}, {**config.to_dict(), "out": None})
    for key in allow_change:
        if key not in CHANGEABLE_ON_RESUME:
            raise ValueError(f"--allow-change {key}: only {', '.join(CHANGEABLE_ON_RESUME)} may change on resume")
    refused = [f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items() if k not in allow_change]
    if refused:
        hint = [k for k in diff if k in CHANGEABLE_ON_RESUME]
        raise ValueError(f"{out} holds a run with another config ({'; '.join(refused)}); resume with the same "
                         "config, or choose another out"
                         + (f" (to change {', '.join(hint)} on resume, add --allow-change {hint[0]})" if hint else ""))
    return diff


def _config_diff(a: dict, b: dict, where: str = "") -> dict[str, tuple]:
    diff = {}
    for k in sorted(set(a) | set(b)):
        key = f"{where}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            diff.update(_config_diff(a[k], b[k], key + "."))
        elif a.get(k) != b.get(k):
            diff[key] = (a.get(k), b.get(k))
    return diff


def train(config: RunConfig, *, progress: bool = True, callback=None, allow_change=(), restart: bool = False) -> Path:
    """Train as `config` says; returns the final model folder (out/model).

    Writes the run folder `config.out` (deepen.rundir): config.yaml; metrics.jsonl (loss, lr, tokens, tokens/s per
    step; held-out perplexity on the general and the domain corpus at step 0, every `eval_every` steps and at the
    end; at step 0 also the base's, measured before growing, when the plan changes the function); checkpoints
    (the last two kept, each file with its size and CRC-32; no pickle); model/ (fp32, with its tokenizer and, for a grown model, expansion.json marked
    trained; a lora run merged into the base weights). A bf16 run holds its frozen weights in bf16 where FSDP
    allows it (`hold_frozen_in_bf16`).

    Data: `batches.streams` says which corpora stream (hub datasets by default; any with data.streaming: true),
    read, split, packed and shuffled as they go; the others are packed in memory. Held-out blocks are read once.

    Rerunning with the same out folder resumes from its last checkpoint: the same batches, the same state, so on
    CPU the same losses as an uninterrupted run. allow_change: config keys a resume may change
    (CHANGEABLE_ON_RESUME, e.g. "train.lr" after a nan loss); the change is recorded in the metrics.
    callback(record, model) runs after each step's record and checkpoint are written (tests stop a run there).

    One writer per run folder: the run holds `out`'s lock (deepen.manifest.one_writer; one lock for all the
    processes of a distributed run, taken by the main one), so a second run into it refuses at once, naming the
    holder. restart: remove what the folder holds of an earlier run (config, logs, checkpoints, model) and start
    over — what to do when its checkpoints are damaged beyond resuming.
    """
    from accelerate import PartialState

    config = check(config)
    state = PartialState(cpu=not torch.accelerator.is_available())
    with _one_writer_per_run(Path(config.out), state):
        if restart and state.is_main_process:
            _clear_run(Path(config.out))
        state.wait_for_everyone()
        return _train(config, progress=progress, callback=callback, allow_change=allow_change)


RUN_FILES = (CONFIG, METRICS, EVALUATIONS, CHECKPOINTS, FINAL, "drift.json")  # what a run writes into its folder


def _clear_run(out: Path) -> None:
    """Remove an earlier run's files from `out` (train(restart=True)); anything else there stays."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@contextmanager
def _one_writer_per_run(out: Path, state):
    """The run folder's lock, held by the main process for all of them; every process raises if it is taken."""
    from accelerate.utils import broadcast_object_list

    holder, error = None, [None]
    if state.is_main_process:
        holder = one_writer(out)
        try:
            holder.__enter__()
        except Exception as e:  # noqa: BLE001 — every process must hear of it, or the others wait forever
            holder, error = None, [f"{type(e).__name__}: {e}" if not isinstance(e, FolderBusy) else str(e)]
    if state.num_processes > 1:
        broadcast_object_list(error)  # the main process's answer, to every process
    if error[0] is not None:
        raise FolderBusy(error[0])
    try:
        yield
    finally:
        if holder is not None:
            holder.__exit__(None, None, None)


def _train(config: RunConfig, *, progress: bool, callback, allow_change) -> Path:
    """train(), with the run folder's lock held."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    t, d, out = config.train, config.data, Path(config.out)
    changes = _refuse_another_config(out, config, allow_change)
    if (out / FINAL / "config.json").is_file():
        if progress:
            print(f"{out} holds a finished run; its model is {out / FINAL}")
        return out / FINAL

    # --- processes: the global batch split over them, in micro-batches
    cpu = not torch.accelerator.is_available()  # on CPU, accelerate joins the processes of torchrun only if told
    device_type = "cpu" if cpu else torch.accelerator.current_accelerator().type
    precision = precision_on(t.precision, device_type)  # auto: bf16 where the device computes it natively
    processes = PartialState(cpu=cpu).num_processes
    per_process, micro, accumulation = batch_layout(t.global_batch, t.micro_batch, processes)
    AcceleratorState._reset_state()  # a singleton: another run in this process may use another precision
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no",
                              gradient_accumulation_steps=accumulation, cpu=cpu)
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    if t.loss_chunk is not None and accelerator.num_processes > 1:
        raise ValueError("train.loss_chunk calls the decoder and the output head on their own, outside the wrapped "
                         "model's forward, which DDP, FSDP and ZeRO-3 need (to sync gradients, to gather shards); set "
                         "train.loss_chunk=null for a run of more than one process")

    def say(message: str) -> None:
        if accelerator.is_main_process:
            print(message, flush=True)

    # --- the data: training batches and held-out blocks (a bad corpus fails here, before the model loads)
    if config.architecture is not None:
        path, tokenizer = None, tiny_tokenizer(config.architecture.vocab_size)
    else:
        path = model_folder(config.model, progress)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as e:
            raise ValueError(f"model={config.model!r}: {e}") from None
    task = objective(config, tokenizer, accelerator.device)  # what the run learns: its data, loss and evaluation
    source, heldout = task.data(say, accelerator.process_index, accelerator.num_processes)

    # --- the model, and what learns (before prepare: FSDP and ZeRO need requires_grad set)
    base = None  # the base's held-out block losses, for forgetting against the base; None: step 0's (the same)

    def score_base(model, plan):
        nonlocal base
        if not preserves_function(plan, config.grow.init):
            base = _base_losses(lambda: model, task, heldout, micro, accelerator)

    set_seed(t.seed)
    model, manifest = build_model(config, path, score_base)
    if config.grow is None and manifest is not None and manifest.trained is None \
            and not manifest.plan.function_preserving:  # grown on disk by a plan that changed the function
        base = _base_losses(lambda: _load_base(manifest.base, progress), task, heldout, micro, accelerator, say)
    masks = BranchMasks(model, manifest.new_layers) if config.grow and config.grow.init == "masked" else None
    ramp = max(1, round(config.grow.mask_ramp * t.steps)) if masks else 1  # steps until the mask is 1
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {config.method} left no parameter to train; check also_train and lora.targets")
    # before the optimizer and prepare; unsharded, a unit may mix dtypes (LoRA's bf16 base under fp32 adapters)
    frozen_in_bf16 = precision == "bf16" and hold_frozen_in_bf16(model, sharded)
    model.config.use_cache = False
    if checkpointing(config, accelerator):
        # use_reentrant=False: the reentrant variant gives no gradients when a block's input needs none (llama-pro)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if t.compile:
        compile_layers(model)

    # --- optimizer, schedule, and where the run stands
    optimizer, schedule = optimizer_and_schedule(params, t, device_type)
    if config.method == "lora" and accelerator.distributed_type.value == "FSDP":
        raise ValueError("method lora under FSDP is not supported (the adapters would be merged into sharded weights); "
                         "train LoRA with data parallelism (configs/accelerate/one-gpu.yaml, or torchrun)")
    model, optimizer = accelerator.prepare(model, optimizer)
    task.prepare(model, source, heldout, micro)  # DPO: the reference, this model before it learns (before a resume)
    checkpoints = Checkpointer(out / CHECKPOINTS, accelerator, model, optimizer, schedule)
    resumed = checkpoints.load()
    start = resumed["step"] if resumed else 0
    if resumed:
        source.restore(*resumed["local"])  # where this process's data streams stood
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    log = MetricsLog(out, start, accelerator.is_main_process)
    log_losses = MetricsLog(out, start, accelerator.is_main_process, EVALUATIONS)  # per block: for intervals
    accelerator.wait_for_everyone()
    if start == 0:
        losses, scores = _evaluate(model, task, heldout, micro, accelerator)
        base = losses if base is None else base
        pinned = {k: v for key in ("domain", "general") for k, v in revisions(getattr(d, key)).items()}
        log({"step": 0, "tokens": 0, **_ppl(losses), **scores, **_ppl(base, "base_"),
             **({"data_revisions": pinned} if pinned else {})})
        log_losses({"step": 0, **_listed(losses), **_listed(base, "base_")})
    elif changes:
        log({"step": start, "tokens": resumed["tokens"], "changed_on_resume": {k: list(v) for k, v in changes.items()}})

    # --- the loop
    stream = source.local_batches(start, accelerator.process_index, accelerator.num_processes)  # this process's share
    tokens = resumed["tokens"] if resumed else 0  # trained on so far (sft and dpo: the examples' real lengths)
    model.train()
    bar = tqdm(range(start + 1, t.steps + 1), initial=start, total=t.steps, desc=f"train {config.method}",
               disable=not progress or not accelerator.is_main_process)
    for step in bar:
        began = time.perf_counter()
        ids, step_tokens = next(stream)  # (per_process, seq) token ids, or example rows; the global batch's tokens
        tokens += step_tokens
        ids = task.batch(ids)
        lr = schedule.get_last_lr()[0]
        if masks:
            masks.set(step / ramp)
        try:
            loss = train_step(model, ids, optimizer, schedule, clip=t.clip, micro_batch=micro, accelerator=accelerator,
                              loss=task.loss)
        except NonFiniteLoss as e:
            raise FloatingPointError(_nan_advice(e, step, checkpoints.last(), t, precision)) from None
        record = {"step": step, "loss": loss, "lr": lr, "tokens": tokens,
                  "tokens_per_s": step_tokens / (time.perf_counter() - began), **source.position()}
        if step % t.eval_every == 0 or step == t.steps:
            losses, scores = _evaluate(model, task, heldout, micro, accelerator)  # back to training mode
            record.update({**_ppl(losses), **scores})
            log_losses({"step": step, **_listed(losses)})
        log(record)
        if step % t.save_every == 0 and step < t.steps:
            checkpoints.save(step, {"tokens": tokens, **source.position()}, local=source.state())
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if callback is not None:
            callback(record, model)

    _save_model(out, config, accelerator, model, tokenizer, manifest, frozen_in_bf16, masks, tokens)
    return out / FINAL


def _evaluate(model, task, heldout, batch_size: int, accelerator) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """({"general": (n,), "domain": (m,)} per-block (or per-example) held-out losses, {other scores}): the
    objective's evaluation, under the run's autocast; the model back in training mode after."""
    with accelerator.autocast():
        return task.evaluate(model, heldout, batch_size)


def _ppl(losses: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}ppl_{key}": math.exp(value.mean().item()) for key, value in losses.items()}


def _listed(losses: dict[str, torch.Tensor], prefix: str = "") -> dict[str, list[float]]:
    return {f"{prefix}{key}": value.tolist() for key, value in losses.items()}


def _base_losses(load, task, heldout, batch_size: int, accelerator, say=print) -> dict | None:
    """The held-out block losses of the model load() gives (the base, not yet prepared), scored on the main
    process's device (the others wait); {} when the base cannot be loaded (then nothing is recorded for it)."""
    losses = {}
    if accelerator.is_main_process:
        try:
            model = load()
        except (OSError, ValueError) as e:
            say(f"the base could not be loaded to measure it ({e}); forgetting and gain will be against step 0")
        else:
            where = next(model.parameters()).device
            losses = _evaluate(model.to(accelerator.device), task, heldout, batch_size, accelerator)[0]
            model.to(where)
    accelerator.wait_for_everyone()
    return losses


def _load_base(name: str, progress: bool):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_folder(name, progress), dtype=torch.float32)


def checkpointing(config: RunConfig, accelerator) -> bool:
    """Whether the run recomputes activations (train.gradient_checkpointing; auto: only on a GPU where
    deepen.budget says the run does not fit without it). Under FSDP the accelerate config's
    fsdp_activation_checkpointing does it instead, so never here."""
    setting = config.train.gradient_checkpointing
    if accelerator.distributed_type.value == "FSDP":
        return False
    if setting != AUTO:
        return bool(setting)
    if accelerator.device.type != "cuda":
        return False
    from deepen.budget import fits_without_checkpointing  # the planner: shapes on the meta device, no weights

    return not fits_without_checkpointing(config, accelerator.num_processes,
                                          torch.cuda.get_device_properties(accelerator.device).total_memory)


def _nan_advice(error: NonFiniteLoss, step: int, kept: Path | None, t, precision: str) -> str:
    fp32 = "" if precision == "fp32" else " or train.precision=fp32"
    if kept is None:
        return (f"{error} at step {step}; stopped before saving anything. No checkpoint was saved yet: start again "
                f"with a lower train.lr (now {t.lr}){fp32}")
    return (f"{error} at step {step}; stopped without saving. The last good checkpoint is {kept}: resume from it "
            f"with a lower learning rate by rerunning the same command with train.lr={t.lr / 10:g} --allow-change "
            f"train.lr (in Python: train(config, allow_change=['train.lr'])){fp32}")


def _save_model(out: Path, config: RunConfig, accelerator, model, tokenizer, manifest: Manifest | None,
                frozen_in_bf16: bool, masks: BranchMasks | None, tokens: int) -> None:
    """out/model: the trained model in fp32 with its tokenizer (and manifest, marked trained); checkpoints removed."""
    model.eval()
    state = accelerator.get_state_dict(model)  # every process takes part: FSDP and ZeRO-3 gather the shards
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if config.method == "lora":  # a plain model: the adapters added into the base weights, in fp32
            final, state = final.to(torch.float32).merge_and_unload(), None
        if masks is not None:  # the branch mask multiplied into its weights: the same function, no mask
            masks.remove()
            state = masks.fold(state if state is not None else final.state_dict())
        if frozen_in_bf16:
            # saved in fp32, like every other run: the trained weights as their fp32 masters, the frozen ones
            # widened exactly from the bf16 they were held (and computed) in; so nothing is lost, the file has
            # one dtype, and config.json says float32 (from_pretrained's dtype="auto" loads it as such)
            state = widened_to_fp32(state if state is not None else final.state_dict())
        final.config.use_cache = True
        # accelerate/transformers warn "Removed shared tensor" for tied embeddings: saved once, tied on load
        shared = logging.getLogger("accelerate.utils.other")
        level = shared.level
        shared.setLevel(logging.ERROR)
        try:
            with atomic_folder(out / FINAL, overwrite=True) as tmp:
                final.save_pretrained(tmp, state_dict=state)
                if frozen_in_bf16:  # save_pretrained wrote the dtype of the first parameter, the bf16 embeddings
                    final.config.dtype = "float32"
                    final.config.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                if manifest is not None:  # the growth, and that the model has since been trained (no longer identical)
                    domain = config.data.domain if isinstance(config.data.domain, str) else [
                        p.name for p in config.data.domain]
                    manifest.after_training(method=config.method, objective=config.objective, domain=domain,
                                            steps=config.train.steps, tokens=tokens).write(tmp)
        finally:
            shared.setLevel(level)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()

