"""A run's configuration: one YAML file (configs/*.yaml) plus `key=value` overrides, checked before any work.

    model: smollm2                 # HF folder, hub id, "smollm2" (offline) or "tiny-base" (trained once, cached)
    grow: {method: llama-pro, groups: 6}   # optional: a plan applied first; the manifest records it
    method: llama-pro              # llama-pro (only new blocks learn) | full | lora | blocks (only `blocks:` learn)
    data: {domain: code, general: general, seq_len: 256}
    train: {steps: 200, global_batch: 32, micro_batch: 8, lr: 2.0e-4, precision: bf16}
    out: runs/smol-code

Every key is a field below; an unknown key or a value of the wrong type fails with a message naming it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METHODS = ("llama-pro", "full", "lora", "blocks")
PRECISIONS = ("fp32", "bf16")


@dataclass
class GrowConfig:
    method: str = "llama-pro"  # a plan builder: llama-pro | dus | idus | stack | custom
    groups: int | None = None
    copies: int = 1
    placement: str = "interleave"
    drop: int | None = None
    group: int = 8
    times: int = 2
    map: str | None = None


@dataclass
class DataConfig:
    domain: str = "code"  # the new domain: built-in (code, math, general), hub id, or local file/glob
    general: str = "general"  # held-out general text: measures forgetting
    seq_len: int = 256
    max_tokens: int | None = None  # cap on training tokens read (None: as many as the steps need); streamed: a pass
    text_column: str = "text"
    # stream the corpora (bounded memory; a resumed run re-reads the stream up to its position) instead of packing
    # them in memory; None: stream hub datasets (and mixtures with one), keep built-ins and local files in memory
    streaming: bool | None = None


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 32  # sequences per optimizer step, whatever the device count
    micro_batch: int = 8  # sequences per device per forward; accumulation makes up the rest
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: float = 0.06  # share of steps
    weight_decay: float = 0.1
    clip: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    eval_every: int = 50
    eval_batches: int = 8  # held-out blocks per corpus: eval_batches × global_batch
    save_every: int = 100
    seed: int = 0


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class RunConfig:
    model: str = "tiny-base"
    method: str = "llama-pro"
    grow: GrowConfig | None = None
    also_train: list[str] = field(default_factory=list)  # llama-pro: extra parameter name parts, e.g. [embed_tokens, norm]
    blocks: list[int] = field(default_factory=list)  # method blocks: the decoder layers that learn, e.g. [3, 7]
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    out: str = "runs/run"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'the config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key {'.'.join(filter(None, [where, unknown[0]]))!r}; "
                         f"known keys{' of ' + where if where else ''}: {', '.join(sorted(known))}")
    kwargs = {k: _value(hints[k], v, ".".join(filter(None, [where, k]))) for k, v in data.items()}
    return cls(**kwargs)


def _value(hint, value, key: str):
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    args = typing.get_args(hint)  # of the hint itself, an Optional unwrapped
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        (item,) = args
        if item is int and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{key} must be a list of integers, got {value!r}")
        return [item(v) for v in value]
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool) \
            or not isinstance(value, hint):
        raise ValueError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def check(config: RunConfig) -> RunConfig:
    """Refuse values that cannot work, naming the key."""
    t = config.train
    if config.method not in METHODS:
        raise ValueError(f"method={config.method!r} is not one of {', '.join(METHODS)}")
    if (config.method == "blocks") != bool(config.blocks):
        raise ValueError("method blocks trains the decoder layers listed in blocks (e.g. blocks=[3,7]); "
                         + ("blocks is empty" if config.method == "blocks" else f"blocks is set but method is {config.method}"))
    if config.method == "blocks" and config.grow is not None:
        raise ValueError("method blocks trains layers of the base as it is (no new parameters); set grow=null, or use "
                         "method llama-pro to train the layers a plan adds")
    if t.precision not in PRECISIONS:
        raise ValueError(f"train.precision={t.precision!r} is not one of {', '.join(PRECISIONS)}")
    for key in ("steps", "global_batch", "micro_batch", "eval_every", "eval_batches", "save_every"):
        if getattr(t, key) < 1:
            raise ValueError(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if t.global_batch % t.micro_batch:
        raise ValueError(f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}")
    if not t.lr > 0 or not 0 <= t.warmup < 1 or not 0 <= t.min_lr_ratio <= 1:
        raise ValueError(f"need train.lr > 0, 0 <= train.warmup < 1 and 0 <= train.min_lr_ratio <= 1; got "
                         f"lr={t.lr}, warmup={t.warmup}, min_lr_ratio={t.min_lr_ratio}")
    if config.data.seq_len < 2:
        raise ValueError(f"data.seq_len must be at least 2, got {config.data.seq_len}")
    return config


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ValueError(f"cannot read the override {item!r}; write key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `a.b=value` overrides (values parsed as YAML), build and check it."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config {path} not found; the presets are in configs/")
        data = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"cannot set {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return check(_build(RunConfig, data, ""))
