"""Training.

- `train(config)`: continual pretraining of a run config (deepen.config) on accelerate — llama-pro (only the
  manifest's new blocks learn), full, or lora (peft); gradient accumulation keeps the global batch whatever the
  process count; periodic held-out perplexity on the general and the domain corpus; JSONL metrics; atomic
  checkpoints; rerunning the same command resumes exactly. `deepen train --config configs/tiny-cpu.yaml`.
- `select_trainable`: which parameters learn, by method (the budget planner counts with the same function).
- `train_steps`: a plain loop over packed blocks, for notebooks; and the tiny rung's base model — a small Llama
  pretrained from scratch on the built-in English text, cached so every notebook and test starts from the same
  one (`tiny_base`)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from filelock import FileLock
from tqdm.auto import tqdm

from deepen.output import atomic_folder

TINY_BASE_CONFIG = "configs/tiny-base.yaml"


def batches(blocks: torch.Tensor, batch_size: int, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """`steps` batches of rows of `blocks` (n_blocks, seq): every row once per epoch, a new order each epoch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(blocks), generator=generator)])
        yield blocks[order[:batch_size]]  # (batch, seq)
        order = order[batch_size:]


def optimizer_and_schedule(params: list, lr: float, weight_decay: float, warmup: float, steps: int,
                           min_lr_ratio: float):
    """AdamW over `params` only (frozen parameters get no state), β = (0.9, 0.95), weight decay on matrices only
    (norms' gains are not decayed); linear warmup over the first `warmup` fraction, cosine down to lr·min_lr_ratio."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95))
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, round(warmup * steps), steps,
                                                           min_lr_rate=min_lr_ratio)
    return optimizer, schedule


def train_steps(model, blocks: torch.Tensor, steps: int, lr: float, batch_size: int, *,
                warmup: float = 0.1, min_lr_ratio: float = 0.1, weight_decay: float = 0.1, clip: float = 1.0,
                precision: str = "fp32", seed: int = 0, progress: bool = True, desc: str = "train") -> list[float]:
    """Train the parameters that require grad for `steps` steps of next-token prediction; return each loss.

    AdamW (β = 0.9, 0.95; weight decay on matrices only), linear warmup over the first `warmup` fraction of
    the steps, then cosine decay to `min_lr_ratio` · lr; gradient norm clipped to `clip`; precision "fp32"
    or "bf16" (autocast). Batches come from `batches(blocks, batch_size, steps, seed)`, so the same
    arguments give the same run.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}; use 'fp32' or 'bf16'")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    optimizer, schedule = optimizer_and_schedule(params, lr, weight_decay, warmup, steps, min_lr_ratio)
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    bar = tqdm(batches(blocks, batch_size, steps, seed), total=steps, desc=desc, disable=not progress)
    for ids in bar:
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss  # labels are shifted inside: predict ids[:, 1:]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {len(losses)}; lower lr (now {lr}) "
                                     "or use precision fp32")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


# ---------------------------------------------------------------- the tiny base model

_SECTIONS = ("model", "data", "train")
_DATA_KEYS = ("corpus", "seq_len", "max_tokens", "eval_blocks")
_TRAIN_KEYS = tuple(p for p in inspect.signature(train_steps).parameters if p not in ("model", "blocks", "desc"))


def load_config(config: str | os.PathLike | dict) -> dict:
    """A config dict, or a YAML path (relative paths: to the working directory, else to the repository);
    checked key by key before any work."""
    if isinstance(config, dict):
        cfg = json.loads(json.dumps(config))  # a deep copy
    else:
        path = Path(config)
        from deepen import REPO

        repo_path = REPO / path
        if not path.is_file() and not path.is_absolute() and repo_path.is_file():
            path = repo_path
        if not path.is_file():
            raise FileNotFoundError(f"config {config} not found (looked in {Path.cwd()} and {repo_path.parent})")
        cfg = yaml.safe_load(path.read_text())
    _check(cfg)
    return cfg


def _check(cfg: dict) -> None:
    from deepen.llama import Config

    allowed = {
        "model": [f.name for f in dataclasses.fields(Config)],
        "data": list(_DATA_KEYS),
        "train": list(_TRAIN_KEYS),
    }
    if not isinstance(cfg, dict):
        raise ValueError(f"a config is a mapping with sections {', '.join(_SECTIONS)}; got {cfg!r}")
    for section in set(cfg) - set(_SECTIONS):
        raise ValueError(f"config has an unknown section {section!r}; sections: {', '.join(_SECTIONS)}")
    for section in _SECTIONS:
        if not isinstance(cfg.get(section) or {}, dict):
            raise ValueError(f"config section {section} must map keys to values; got {cfg[section]!r}")
    for section, keys in allowed.items():
        for key in set(cfg.get(section) or {}) - set(keys):
            raise ValueError(f"config key {section}.{key} is unknown; {section} takes {', '.join(keys)}")
    for key in ("model.vocab_size", "data.corpus", "data.seq_len", "train.steps", "train.lr", "train.batch_size"):
        section, name = key.split(".")
        if name not in (cfg.get(section) or {}):
            raise ValueError(f"config key {key} is missing")


def tiny_base_dir(config: str | os.PathLike | dict = TINY_BASE_CONFIG) -> Path:
    """Where the model trained from `config` is cached: one folder per distinct config."""
    cfg = load_config(config)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    from deepen.models import cache_dir

    return cache_dir() / f"tiny-base-{digest}"


def pretrain_tiny(config: str | os.PathLike | dict = TINY_BASE_CONFIG, out: str | os.PathLike | None = None,
                  progress: bool = True, threads: int | None = 1) -> Path:
    """Pretrain a tiny Llama from scratch as `config` says; save it (safetensors + tokenizer + pretrain.json
    with the losses and held-out perplexity) to `out`, by default the cache. Does nothing if it is there.

    threads: torch threads while training (None: as they are). 1 is the safe default for a model this small:
    on a machine shared with other work (a 2-core CI runs two test workers), more threads than free cores
    make OpenMP wait for descheduled threads, and a step takes 3-10x longer.
    """
    cfg = load_config(config)
    out = Path(out) if out is not None else tiny_base_dir(cfg)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # parallel test workers and notebooks train it once
        if not (out / "config.json").is_file():
            _pretrain(cfg, out, progress, threads)
    return out


def _pretrain(cfg: dict, out: Path, progress: bool, threads: int | None) -> None:
    from transformers import LlamaForCausalLM

    from deepen.data import load_corpus, pack, tiny_tokenizer
    from deepen.evaluate import perplexity, unigram_perplexity
    from deepen.llama import Config

    data, train = cfg["data"], cfg["train"]
    tokenizer = tiny_tokenizer(cfg["model"]["vocab_size"])
    train_blocks = pack(load_corpus(data["corpus"], "train"), tokenizer, data["seq_len"], data.get("max_tokens"))
    heldout = pack(load_corpus(data["corpus"], "heldout"), tokenizer, data["seq_len"])[: data.get("eval_blocks")]
    torch.manual_seed(train.get("seed", 0))
    model = LlamaForCausalLM(Config(**cfg["model"]).to_hf())
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    start = time.perf_counter()
    try:
        losses = train_steps(model, train_blocks, progress=progress, desc="pretrain tiny base", **train)
    finally:
        torch.set_num_threads(before)
    seconds = time.perf_counter() - start
    report = {
        "config": cfg,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_seen": train["steps"] * train["batch_size"] * data["seq_len"],
        "train_seconds": round(seconds, 1),
        "heldout_perplexity": perplexity(model, heldout),
        "unigram_perplexity": unigram_perplexity(train_blocks, heldout, cfg["model"]["vocab_size"]),
        "losses": losses,
    }
    if not math.isfinite(report["heldout_perplexity"]):
        raise FloatingPointError(f"held-out perplexity is {report['heldout_perplexity']}; nothing saved")
    with atomic_folder(out, overwrite=True) as tmp:  # overwrite: an incomplete earlier attempt (no config.json)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(report, indent=1))


def tiny_base(config: str | os.PathLike | dict = TINY_BASE_CONFIG, threads: int | None = 1):
    """(model, tokenizer): the tiny Llama that knows some English, trained on first use (minutes), then cached.

    The model is a transformers LlamaForCausalLM in eval mode; `pretrain.json` in its folder
    (`model.name_or_path`) holds its training losses and held-out perplexity.
    """
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    path = pretrain_tiny(config, threads=threads)
    return LlamaForCausalLM.from_pretrained(path).eval(), PreTrainedTokenizerFast.from_pretrained(path)


# ---------------------------------------------------------------- continual pretraining of a run config

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


def read_metrics(folder: str | os.PathLike) -> list[dict]:
    """The records of a run folder's metrics.jsonl, one per logged step (a partly written line of a run in
    progress is skipped); those with "ppl_general" are the held-out evaluations."""
    records = []
    for line in Path(folder, METRICS).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
FINAL = "model"


def select_trainable(model: torch.nn.Module, method: str, layers: list[int], also_train: list[str] = ()) -> None:
    """Set requires_grad by the method: `full` trains everything; `llama-pro` and `blocks` only the decoder
    `layers` (for llama-pro the ones a plan added; `trained_layers` says which); `lora` only the adapters peft
    added (names with `lora_`; none on a model without them). Parameters whose name contains a part in
    `also_train` learn too (e.g. "embed_tokens", "norm")."""
    if method == "llama-pro" and not layers:
        raise ValueError("method llama-pro trains only the layers a plan added: add a grow: section to the config "
                         "or point model at a folder made by `deepen expand` (with expansion.json)")
    n_layers = model.config.num_hidden_layers
    if method == "blocks" and not all(0 <= i < n_layers for i in layers):
        raise ValueError(f"blocks={list(layers)}: the model has decoder layers 0..{n_layers - 1}")
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    for name, p in model.named_parameters():
        p.requires_grad_(method == "full" or method in ("llama-pro", "blocks") and name.startswith(prefixes)
                         or method == "lora" and "lora_" in name
                         or any(part in name for part in also_train))


def trained_layers(config, new_layers: list[int]) -> list[int]:
    """The decoder layers a run config trains when its method trains whole blocks: `blocks:` for method blocks
    (e.g. every 4th original block, the control with no new parameters), else the plan's new layers."""
    return list(config.blocks) if config.method == "blocks" else list(new_layers)


def model_path(name: str) -> str:
    """A model name of a run config as a folder or hub id: "tiny-base" is the cached tiny base (trained on first
    use), "smollm2" the offline SmolLM2-135M; a folder or hub id stays as it is."""
    from deepen.models import resolve

    return str(pretrain_tiny(progress=False)) if name == "tiny-base" else resolve(name)


def _load_model(config, path: str):
    """(model, manifest or None): the run's model in fp32, grown by its plan if it has one (a bf16 run then holds
    its frozen weights in bf16: `hold_frozen_in_bf16`)."""
    from transformers import AutoModelForCausalLM

    from deepen.budget import grow_plan
    from deepen.grow import grow
    from deepen.output import MANIFEST, read_manifest

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    plan = grow_plan(config, model.config.num_hidden_layers)
    if plan is not None:
        model = grow(model, plan)
        manifest = {"base": config.model, "plan": plan.to_dict(), "new_layers": plan.new_layers}
    elif Path(path, MANIFEST).is_file():
        manifest = read_manifest(path)[1]
    else:
        manifest = None
    return model, manifest


def uniform_units(model: torch.nn.Module) -> bool:
    """Whether each FSDP unit of `model` is wholly trainable or wholly frozen: each decoder layer (one unit per
    layer, as configs/accelerate/fsdp2-8gpu.yaml wraps them) and the rest (embeddings, final norm, head). True for
    llama-pro, and for blocks without also_train; false for lora (adapters inside frozen layers) and for an
    also_train that reaches into frozen layers (e.g. "norm")."""
    units: dict[str, set[bool]] = {}
    for name, p in model.named_parameters():
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        units.setdefault(layer.group(1) if layer else "rest", set()).add(p.requires_grad)
    return all(len(learns) == 1 for learns in units.values())


def hold_frozen_in_bf16(model: torch.nn.Module) -> bool:
    """In a bf16 run, hold the parameters that do not learn in bf16 (2 bytes, what deepen.budget counts); those
    that learn stay fp32, the master weights AdamW updates (its state is fp32 too). Only when `uniform_units`:
    FSDP2 wants one original dtype per unit, so a model with a unit that mixes frozen and trainable parameters
    (lora, an also_train inside frozen layers) keeps every weight in fp32, as before (full: nothing is frozen;
    peft's usual bf16 base under fp32 adapters would mix dtypes inside each layer's unit). Call after
    select_trainable and before the optimizer and accelerator.prepare. Returns whether it cast anything.

    Tied embeddings stay tied: embed_tokens and lm_head are one Parameter, cast once in place (`.data`).
    Under autocast the forward then runs as before except for the residual stream's dtype: the frozen embedding
    gives bf16 hidden states and every residual add is bf16 + bf16 (the attention and MLP outputs come from
    autocast linears), so the residual stream is bf16 throughout (it was fp32: fp32 embeddings), as it already
    was under FSDP2, which computes with bf16 copies of every weight. RMSNorm normalises in fp32 and multiplies
    by its weight after casting back to the input dtype: a frozen (bf16) norm gives bf16, a trainable (fp32)
    one promotes to fp32, and the next autocast linear takes either; the logits are bf16 and the loss upcasts
    them to fp32."""
    frozen = [p for p in model.parameters() if not p.requires_grad]  # a tied parameter is listed once
    if not frozen or not uniform_units(model):
        return False
    for p in frozen:
        p.data = p.data.to(torch.bfloat16)
    return True


def _in_fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with its bf16 tensors widened to fp32 on the CPU (exact: every bf16 value is an fp32 value);
    a tensor under two names (tied embeddings) stays one tensor, so it is still saved once."""
    widened: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            key = (tensor.data_ptr(), tensor.shape)
            if key not in widened:
                widened[key] = tensor.to("cpu", torch.float32)
            tensor = widened[key]
        out[name] = tensor
    return out


_PACKED: dict[tuple, torch.Tensor] = {}


def packed(corpus: str, split: str, tokenizer, seq_len: int, max_tokens: int | None, text_column: str = "text"):
    """Packed blocks (n, seq_len) of a corpus split, the first `max_tokens`; kept in memory for the next run in
    this process (a notebook comparing methods packs each corpus once). Keyed by the corpus name, so a local
    file edited between runs is read again only in a new process."""
    from deepen.data import load_corpus, pack

    key = (corpus, split, tokenizer.name_or_path, len(tokenizer), seq_len, max_tokens, text_column)
    if key not in _PACKED:
        _PACKED[key] = pack(load_corpus(corpus, split, text_column=text_column), tokenizer, seq_len, max_tokens)
    return _PACKED[key]


def streams(data, corpus: str) -> bool:
    """Whether a run with data config `data` (deepen.config.DataConfig) streams `corpus`: data.streaming if set,
    else only when the corpus is a hub dataset (or a mixture with one); built-ins and local files are packed."""
    from deepen.data import is_hub_name

    return data.streaming if data.streaming is not None else is_hub_name(corpus)


class InMemoryBatches:
    """Global batches of the training blocks packed in memory: `batches`, every block once per epoch."""

    def __init__(self, blocks: torch.Tensor, global_batch: int, steps: int, seed: int):
        self.blocks, self.global_batch, self.steps, self.seed = blocks, global_batch, steps, seed

    def global_batches(self, start: int) -> Iterator[torch.Tensor]:
        """(global_batch, seq_len) for steps start+1, start+2, ...: the same on every process."""
        stream = batches(self.blocks, self.global_batch, self.steps, self.seed)
        for _ in range(start):
            next(stream)  # the data position of the checkpoint
        return stream

    def position(self) -> dict:
        return {}


class StreamedBatches:
    """Global batches of a corpus streamed as it is read (`deepen.data.stream_blocks`): bounded memory, shuffled
    in a seeded buffer, a new pass over the corpus whenever it ends. The stream is deterministic for a seed, so
    resuming at step `start` reads and drops its first start × global_batch blocks: the same position, at the cost
    of reading those again. The first block is read at once, so a bad corpus fails before the model loads."""

    def __init__(self, corpus: str, tokenizer, data, global_batch: int, seed: int, say=print):
        from deepen.data import STREAM_SHUFFLE_BLOCKS, stream_blocks

        self.corpus, self.global_batch, self.passes, self.say = corpus, global_batch, 0, say
        self.blocks = stream_blocks(corpus, "train", tokenizer, data.seq_len, text_column=data.text_column,
                                    seed=seed, shuffle_buffer=STREAM_SHUFFLE_BLOCKS, max_tokens=data.max_tokens,
                                    on_pass=self._passed)
        self.first = next(self.blocks)

    def _passed(self, k: int, documents: int, tokens: int) -> None:
        self.passes = k + 1
        self.say(f"{self.corpus}: pass {k + 1} over the training stream done ({documents:,} documents, "
                 f"{tokens:,} tokens); starting pass {k + 2}")

    def global_batches(self, start: int) -> Iterator[torch.Tensor]:
        blocks = itertools.chain([self.first], self.blocks)
        for _ in itertools.islice(blocks, start * self.global_batch):
            pass  # the data position of the checkpoint, read again
        while True:
            yield torch.stack(list(itertools.islice(blocks, self.global_batch)))

    def position(self) -> dict:
        return {"data_passes": self.passes}  # passes over the corpus read to their end so far


def _streamed_heldout(corpus: str, tokenizer, data, n_blocks: int) -> torch.Tensor:
    """The first `n_blocks` packed blocks of a corpus's held-out split, streamed in order: the blocks `packed` gives."""
    from deepen.data import stream_blocks

    blocks = list(itertools.islice(stream_blocks(corpus, "heldout", tokenizer, data.seq_len, passes=1,
                                                 text_column=data.text_column), n_blocks))
    if not blocks:
        raise ValueError(f"the held-out split does not fill one block of seq_len={data.seq_len}")
    return torch.stack(blocks)


def _last_checkpoint(out: Path) -> Path | None:
    done = sorted((out / CHECKPOINTS).glob("step-*[0-9]")) if (out / CHECKPOINTS).is_dir() else []
    return done[-1] if done else None


def _config_diff(a: dict, b: dict, where: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    diff = []
    for k in keys:
        key = f"{where}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            diff += _config_diff(a[k], b[k], key + ".")
        elif a.get(k) != b.get(k):
            diff.append(f"{key}: {a.get(k)!r} then, {b.get(k)!r} now")
    return diff


def train(config, *, progress: bool = True, callback=None) -> Path:
    """Continual pretraining as `config` (a deepen.config.RunConfig) says; returns the final model folder.

    Writes into `config.out`: config.yaml, metrics.jsonl (one record per step: loss, lr, tokens, tokens/s;
    held-out perplexity on the general and the domain corpus at step 0, every `eval_every` steps and at the
    end), checkpoints/step-N (weights as safetensors, optimizer, RNG, schedule and data position; written to a
    temporary folder and renamed, only the last kept) and model/ (loadable by from_pretrained, with its
    tokenizer and, for a grown model, expansion.json; a lora run is merged into the base weights; fp32).
    A bf16 run holds its frozen weights in bf16 where FSDP allows it (`hold_frozen_in_bf16`).

    Data: `streams` says which corpora stream — hub datasets by default (data.streaming: None), any corpus with
    data.streaming: true — read, split, packed and shuffled as they go in bounded memory (`StreamedBatches`); the
    others are packed in memory (`InMemoryBatches`). Held-out blocks are read once, at the start, either way.

    Rerunning with the same out folder resumes from its last checkpoint: the same batches, the same state,
    so on CPU the same losses as an uninterrupted run (a streamed corpus is read again up to that position).
    callback(record, model) runs after each step's record and checkpoint are written (tests stop a run there).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from deepen.config import check
    from deepen.evaluate import perplexity

    config = check(config)
    t, d = config.train, config.data
    out = Path(config.out)
    cpu = not torch.accelerator.is_available()  # on CPU, accelerate joins the processes of torchrun only if told
    processes = PartialState(cpu=cpu).num_processes
    if t.global_batch % (t.micro_batch * processes):
        raise ValueError(f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}"
                         f" × {processes} processes; change train.micro_batch or the process count")
    per_process = t.global_batch // processes
    accumulation = per_process // t.micro_batch  # global batch = micro_batch × accumulation × processes
    AcceleratorState._reset_state()  # a singleton: another run in this process may use another precision
    accelerator = Accelerator(mixed_precision="bf16" if t.precision == "bf16" else "no",
                              gradient_accumulation_steps=accumulation, cpu=cpu)

    saved_config = out / "config.yaml"
    if saved_config.is_file():
        # out may be named another way (relative, absolute, a moved folder): the folder itself is the run
        diff = _config_diff({**yaml.safe_load(saved_config.read_text()), "out": None}, {**config.to_dict(), "out": None})
        if diff:
            raise ValueError(f"{out} holds a run with another config ({'; '.join(diff)}); resume with the same "
                             "config, or choose another out")
    if (out / FINAL / "config.json").is_file():
        if progress:
            print(f"{out} holds a finished run; its model is {out / FINAL}")
        return out / FINAL

    path = model_path(config.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ValueError(f"model={config.model!r}: {e}") from None

    def data(key: str, read):  # what read(corpus) reads from data.<key>; an error names the key
        corpus = getattr(d, key)
        try:
            return read(corpus)
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            raise type(e)(f"data.{key}={corpus!r}: {e}") from None

    def say(message: str) -> None:
        if PartialState().is_main_process:
            print(message, flush=True)

    seq_len = d.seq_len
    n_eval = t.eval_batches * t.global_batch  # the same held-out blocks whatever the micro-batch

    def training(corpus: str):  # hub corpora stream (see `streams`); built-ins and local files are packed in memory
        if streams(d, corpus):
            return StreamedBatches(corpus, tokenizer, d, t.global_batch, t.seed, say)
        tokens = d.max_tokens or t.steps * t.global_batch * seq_len  # the first tokens the steps need
        return InMemoryBatches(packed(corpus, "train", tokenizer, seq_len, tokens, d.text_column),
                               t.global_batch, t.steps, t.seed)

    def heldout_blocks(corpus: str) -> torch.Tensor:  # (n_eval or fewer, seq_len), in memory either way
        if streams(d, corpus):
            return _streamed_heldout(corpus, tokenizer, d, n_eval)
        return packed(corpus, "heldout", tokenizer, seq_len, n_eval * seq_len, d.text_column)

    source = data("domain", training)  # .global_batches(start): the one interface the loop below reads
    heldout = {key: data(key, heldout_blocks) for key in ("general", "domain")}

    set_seed(t.seed)
    model, manifest = _load_model(config, path)
    new_layers = manifest["new_layers"] if manifest else []
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha,
                                                 lora_dropout=config.lora.dropout, target_modules=config.lora.targets))
    select_trainable(model, config.method, trained_layers(config, new_layers), config.also_train)  # before prepare: FSDP/ZeRO need it
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {config.method} left no parameter to train; check also_train and lora.targets")
    frozen_in_bf16 = t.precision == "bf16" and hold_frozen_in_bf16(model)  # before the optimizer and prepare
    model.config.use_cache = False
    if t.gradient_checkpointing:
        # use_reentrant=False: the reentrant variant gives no gradients when a block's input needs none (llama-pro)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    optimizer, schedule = optimizer_and_schedule(params, t.lr, t.weight_decay, t.warmup, t.steps, t.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters
    accelerator.register_for_checkpointing(schedule)  # stepped once per optimizer step, by us

    start = 0
    last = _last_checkpoint(out)
    if last is not None:
        accelerator.load_state(str(last))
        start = json.loads((last / "state.json").read_text())["step"]
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        saved_config.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        metrics = out / METRICS
        kept = [line for line in (metrics.read_text().splitlines() if metrics.is_file() else [])
                if start and json.loads(line)["step"] <= start]  # a killed run logged past its checkpoint
        metrics.write_text("".join(line + "\n" for line in kept))
    accelerator.wait_for_everyone()

    def evaluate() -> dict:
        with accelerator.autocast():
            return {f"ppl_{key}": perplexity(model, held, t.micro_batch) for key, held in heldout.items()}

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(step: int) -> None:
        tmp = out / CHECKPOINTS / f".step-{step:07d}.partial"
        # accelerate warns "Removed shared tensor" for tied embeddings: saved once and tied again on load, as meant
        shared = logging.getLogger("accelerate.utils.other")
        level = shared.level
        shared.setLevel(logging.ERROR)
        try:
            accelerator.save_state(str(tmp))
        finally:
            shared.setLevel(level)
        if accelerator.is_main_process:
            (tmp / "state.json").write_text(json.dumps({"step": step, "tokens": step * t.global_batch * seq_len}))
            os.replace(tmp, out / CHECKPOINTS / f"step-{step:07d}")
            for old in (out / CHECKPOINTS).glob("step-*"):
                if old.name != f"step-{step:07d}":
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()

    if start == 0:
        log({"step": 0, "tokens": 0, **evaluate()})
    rank = accelerator.process_index
    stream = source.global_batches(start)  # the same global batches on every process, from the checkpoint's position
    model.train()
    bar = tqdm(range(start + 1, t.steps + 1), initial=start, total=t.steps, desc=f"train {config.method}",
               disable=not progress or not accelerator.is_main_process)
    for step in bar:
        began = time.perf_counter()
        ids = next(stream)[rank * per_process:(rank + 1) * per_process].to(accelerator.device)  # (per_process, seq)
        lr = schedule.get_last_lr()[0]
        loss = torch.zeros((), device=accelerator.device)
        for micro in ids.split(t.micro_batch):  # (micro_batch, seq)
            with accelerator.accumulate(model):
                micro_loss = model(input_ids=micro, labels=micro).loss  # labels shift inside: predict micro[:, 1:]
                accelerator.backward(micro_loss)  # divided by the accumulation steps
            loss += micro_loss.detach() / accumulation
        loss = accelerator.reduce(loss, "mean").item()
        if not math.isfinite(loss):
            kept = _last_checkpoint(out)
            raise FloatingPointError(
                f"loss is {loss} at step {step}; stopped without saving. "
                + (f"The last good checkpoint is {kept} (rerun to resume from it after lowering train.lr, now "
                   f"{t.lr}, or using train.precision=fp32)." if kept else
                   f"No checkpoint was saved yet; lower train.lr (now {t.lr}) or use train.precision=fp32."))
        accelerator.clip_grad_norm_(params, t.clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - began
        record = {"step": step, "loss": loss, "lr": lr, "tokens": step * t.global_batch * seq_len,
                  "tokens_per_s": t.global_batch * seq_len / seconds, **source.position()}
        if step % t.eval_every == 0 or step == t.steps:
            record.update(evaluate())  # perplexity puts the model back in training mode
        log(record)
        if step % t.save_every == 0 and step < t.steps:
            save(step)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if callback is not None:
            callback(record, model)

    model.eval()
    state = accelerator.get_state_dict(model)  # every process takes part: FSDP and ZeRO-3 gather the shards
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if config.method == "lora":
            final, state = final.merge_and_unload(), None  # a plain model: the adapters added into the base weights
        elif frozen_in_bf16:
            # saved in fp32, like every other run: the trained weights as their fp32 masters, the frozen ones
            # widened exactly from the bf16 they were held (and computed) in; so nothing is lost, the file has
            # one dtype, and config.json says float32 (from_pretrained's dtype="auto" loads it as such)
            state = _in_fp32(state if state is not None else final.state_dict())
        final.config.use_cache = True
        with atomic_folder(out / FINAL, overwrite=True) as tmp:
            final.save_pretrained(tmp, state_dict=state)
            if frozen_in_bf16:  # save_pretrained wrote the dtype of the first parameter, the bf16 embeddings
                final.config.dtype = "float32"
                final.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if manifest is not None:  # the growth, and that the model has since been trained (no longer identical)
                trained = {"method": config.method, "domain": d.domain, "steps": t.steps,
                           "tokens": t.steps * t.global_batch * seq_len}
                (tmp / "expansion.json").write_text(json.dumps({**manifest, "trained": trained}, indent=2) + "\n")
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out / FINAL
