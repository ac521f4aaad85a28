"""Training: one loop (`train_steps`), and the tiny rung's base model — a small Llama pretrained from scratch
on the built-in English text, cached so that every notebook and test starts from the same one (`tiny_base`)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from filelock import FileLock
from tqdm.auto import tqdm

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


def train_steps(model, blocks: torch.Tensor, steps: int, lr: float, batch_size: int, *,
                warmup: float = 0.1, min_lr_ratio: float = 0.1, weight_decay: float = 0.1, clip: float = 1.0,
                precision: str = "fp32", seed: int = 0, progress: bool = True, desc: str = "train") -> list[float]:
    """Train the parameters that require grad for `steps` steps of next-token prediction; return each loss.

    AdamW (β = 0.9, 0.95; weight decay on matrices only), linear warmup over the first `warmup` fraction of
    the steps, then cosine decay to `min_lr_ratio` · lr; gradient norm clipped to `clip`; precision "fp32"
    or "bf16" (autocast). Batches come from `batches(blocks, batch_size, steps, seed)`, so the same
    arguments give the same run.
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}; use 'fp32' or 'bf16'")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],  # norms' gains are not decayed
        lr=lr, betas=(0.9, 0.95))
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, round(warmup * steps), steps,
                                                           min_lr_rate=min_lr_ratio)
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
        repo_path = Path(__file__).resolve().parents[2] / path
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(report, indent=1))
        if out.exists():
            shutil.rmtree(out)  # an incomplete earlier attempt: no config.json
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tiny_base(config: str | os.PathLike | dict = TINY_BASE_CONFIG, threads: int | None = 1):
    """(model, tokenizer): the tiny Llama that knows some English, trained on first use (minutes), then cached.

    The model is a transformers LlamaForCausalLM in eval mode; `pretrain.json` in its folder
    (`model.name_or_path`) holds its training losses and held-out perplexity.
    """
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    path = pretrain_tiny(config, threads=threads)
    return LlamaForCausalLM.from_pretrained(path).eval(), PreTrainedTokenizerFast.from_pretrained(path)
