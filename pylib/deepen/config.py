"""A run's configuration: one YAML file (configs/*.yaml) plus `key=value` overrides, checked before any work.

    model: smollm2                 # HF folder, hub id, "smollm2" (offline) or "tiny-base" (trained once, cached)
    grow: {method: llama-pro, groups: 6}   # optional: a plan applied first; the manifest records it
    method: llama-pro              # llama-pro (only new blocks learn) | full | lora | blocks (only `blocks:` learn)
    data: {domain: code, general: general, seq_len: 256}
    train: {steps: 200, global_batch: 32, micro_batch: 8, lr: 2.0e-4, precision: bf16}
    out: runs/smol-code

Every run is this one schema: continual pretraining, and pretraining from scratch (`architecture:` a
deepen.llama.Config instead of `model:` — how the tiny rung's base is made, configs/tiny-base.yaml). Every key is a
field below; an unknown key or a value of the wrong type fails with a message naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deepen import REPO
from deepen import plan as plans
from deepen.grow import INITS
from deepen.llama import Config as Architecture
from deepen.models import cache_dir

TRAIN_METHODS = ("llama-pro", "full", "lora", "blocks")
# What a run learns: lm (continual pretraining, next token on packed text), sft (instruction tuning: the response
# tokens of instruction examples), dpo (preference pairs; sDPO with dpo.stages > 1).
OBJECTIVES = ("lm", "sft", "dpo")
TEMPLATES = ("alpaca", "model")  # sft/dpo: SOLAR's Alpaca-style template, or the tokenizer's own chat template
# auto: bf16 autocast where the device computes bf16 natively (CUDA; a CPU with AVX-512 bf16 or AMX), else fp32
PRECISIONS = ("fp32", "bf16", "auto")
AUTO = "auto"


def _plan(self, n_layers: int) -> plans.Plan:
    """This plan for a base of `n_layers` layers."""
    return plans.build(self.method, n_layers, **{a.name: getattr(self, a.name) for a in plans.PLAN_ARGS})


# `grow:` — a plan builder (deepen.plan.PLANS: llama-pro | dus | idus | stack | custom) and its arguments, each
# field made from the plan registry's declaration (deepen.plan.PLAN_ARGS: add a plan argument there), then how the
# new layers start: init (deepen.grow.INITS: plan | copy | random | zeros | masked) and, for masked, the share of
# the steps over which the branch mask ramps from 0 to 1.
GrowConfig = dataclasses.make_dataclass(
    "GrowConfig",
    [("method", str, field(default="llama-pro")),
     *[(a.name, a.type | None if a.default is None else a.type, field(default=a.default)) for a in plans.PLAN_ARGS],
     ("init", str, field(default="plan")), ("mask_ramp", float, field(default=0.1))],
    namespace={"plan": _plan, "__doc__": "A run's `grow:` section: the plan and how its new layers start.",
               "__module__": __name__})


@dataclass
class Corpus:
    """One corpus, or one part of a mixture, as a record: what to read and how. The short forms "code" and
    "code:0.6,math:0.4" mean records with a name and a weight; a hub dataset's other settings need the record:
        {name: bigcode/the-stack-dedup, data_dir: data/python, text_column: content, weight: 0.38, revision: <sha>}"""

    name: str  # a built-in (general, wiki, code, math), a local file, folder or glob, or a hub dataset id
    weight: float = 1.0  # in a mixture: its share, relative to the other parts' (by characters)
    config: str | None = None  # hub: the dataset's configuration ("user/name:config" in the short form)
    data_dir: str | None = None  # hub: the dataset's folder to read (the Stack's Python: data/python)
    split: str = "train"  # the split of the files to read (our held-out share is taken from it by hash)
    text_column: str | None = None  # the column holding the text (None: data.text_column)
    revision: str | None = None  # hub: a commit sha or tag, pinned so that a resume reads the same data
    heldout_fraction: float = 0.05  # the share held out (by a hash of each text); 1.0: an evaluation-only corpus


@dataclass
class DataConfig:
    # the new domain: a built-in (code, math, general, wiki), a hub id, a local file/glob, a mixture
    # "code:0.6,math:0.4", or a list of Corpus records
    domain: str | list[Corpus] = "code"
    general: str | list[Corpus] = "general"  # held-out general text: measures forgetting
    seq_len: int = 256
    max_tokens: int | None = None  # cap on training tokens read (None: as many as the steps need); streamed: a pass
    text_column: str = "text"
    # stream the corpora (bounded memory; a resumed run re-reads the stream up to its position) instead of packing
    # them in memory; None: stream hub datasets (and mixtures with one), keep built-ins and local files in memory
    streaming: bool | None = None
    template: str = "alpaca"  # sft/dpo: the chat template, alpaca (SOLAR's) or model (the tokenizer's own)
    max_examples: int | None = None  # sft/dpo: training examples read (None: as many as the steps need)


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 32  # sequences per optimizer step, whatever the device count
    micro_batch: int = 8  # at most this many sequences per device per forward; accumulation makes up the rest
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: float = 0.06  # share of steps
    weight_decay: float = 0.1
    clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast; fp32 master weights) | auto (PRECISIONS)
    # recompute each decoder layer's activations in the backward: true, false, or auto (on only when deepen.budget
    # says the run does not fit the GPU without it; off on a CPU)
    gradient_checkpointing: bool | str = False
    compile: bool = False  # torch.compile each decoder layer (a GPU speed-up after about a minute of compiling)
    fused_adamw: bool | str = AUTO  # AdamW's fused kernel: true, false, or auto (on CUDA only)
    loss_chunk: int | None = None  # tokens per piece of the next-token loss: the fp32 logits of one piece are held at
    # a time (recomputed in the backward) instead of a whole micro-batch's; None: the whole micro-batch at once
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
class DPOConfig:
    beta: float = 0.1  # the strength of the pull towards the reference: r(y) = beta (log pi(y|x) - log pi_ref(y|x))
    stages: int = 1  # sDPO: the pairs split into this many chunks, trained one after another; each stage's
    stage: int = 0  # reference the stage before's result (deepen dpo --stages K runs them; stage: which chunk)


@dataclass
class RunConfig:
    model: str | None = "tiny-base"
    architecture: Architecture | None = None  # pretraining from scratch: a new model of this shape (model: null)
    method: str = "llama-pro"
    objective: str = "lm"  # lm | sft | dpo (OBJECTIVES)
    grow: GrowConfig | None = None
    also_train: list[str] = field(default_factory=list)  # llama-pro: extra parameter name parts, e.g. [embed_tokens, norm]
    blocks: list[int] = field(default_factory=list)  # method blocks: the decoder layers that learn, e.g. [3, 7]
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    out: str = "runs/run"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short hash naming this run (cache entries, run folders): its fields minus `out`, and minus those at
        their defaults — a section that is there (`grow:`, `architecture:`) against its own defaults — so that a
        field added to the schema later, at a default that changes nothing, keeps every key it had."""
        defaults = {**RunConfig().to_dict(), "grow": dataclasses.asdict(GrowConfig()),
                    "architecture": dataclasses.asdict(Architecture())}
        changed = _changed(self.to_dict(), defaults, present=("grow", "architecture"))
        changed.pop("out", None)
        return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]

    def plan(self, n_layers: int) -> plans.Plan | None:
        """The `grow:` plan for a base of `n_layers` layers (None without one)."""
        return None if self.grow is None else self.grow.plan(n_layers)


def batch_layout(global_batch: int, micro_batch: int, processes: int) -> tuple[int, int, int]:
    """(per-process batch, micro-batch, accumulation steps): each of `processes` takes global_batch / processes
    sequences per step, in the largest micro-batches of at most `micro_batch` that divide it, so that
    global_batch = micro × accumulation × processes whatever the process count."""
    if global_batch % processes:
        counts = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise ValueError(f"train.global_batch={global_batch} cannot be split over {processes} processes; run "
                         f"{', '.join(map(str, counts[:12]))}{', ...' if len(counts) > 12 else ''} processes or "
                         "change train.global_batch")
    per_process = global_batch // processes
    micro = max(d for d in range(1, min(micro_batch, per_process) + 1) if per_process % d == 0)
    return per_process, micro, per_process // micro


def stage_span(n: int, stages: int, stage: int) -> tuple[int, int]:
    """Where sDPO stage `stage` of `stages` starts and ends in n items (its steps, or its pairs): the shares differ
    by at most one and together cover all n."""
    return stage * n // stages, (stage + 1) * n // stages


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
        options = [a for a in args if a is not type(None)]
        # str | list[...]: the type the value has (a list of records, or a name)
        hint = next((a for a in options if typing.get_origin(a) is list and isinstance(value, list)
                     or a is str and isinstance(value, str)), options[0])
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    args = typing.get_args(hint)  # of the hint itself, an Optional unwrapped
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        (item,) = args
        if dataclasses.is_dataclass(item):
            if not value:
                raise ValueError(f"{key} is an empty list; give at least one record")
            return [_build(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
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
    if config.method not in TRAIN_METHODS:
        raise ValueError(f"method={config.method!r} is not one of {', '.join(TRAIN_METHODS)}")
    if config.objective not in OBJECTIVES:
        raise ValueError(f"objective={config.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if config.data.template not in TEMPLATES:
        raise ValueError(f"data.template={config.data.template!r} is not one of {', '.join(TEMPLATES)}")
    if config.dpo.stages < 1 or not 0 <= config.dpo.stage < config.dpo.stages or not config.dpo.beta > 0:
        raise ValueError(f"need dpo.beta > 0, dpo.stages >= 1 and 0 <= dpo.stage < dpo.stages; got beta="
                         f"{config.dpo.beta}, stages={config.dpo.stages}, stage={config.dpo.stage}")
    if (config.model is None) == (config.architecture is None):
        raise ValueError("a run starts from a model (model: a folder, hub id, smollm2 or tiny-base) or trains one "
                         "from scratch (architecture: a deepen.llama.Config, with model: null); give exactly one")
    if config.architecture is not None and (config.method != "full" or config.grow is not None):
        raise ValueError("a model trained from scratch (architecture:) learns every parameter: use method full "
                         "and no grow: section")
    if (config.method == "blocks") != bool(config.blocks):
        raise ValueError("method blocks trains the decoder layers listed in blocks (e.g. blocks=[3,7]); "
                         + ("blocks is empty" if config.method == "blocks" else f"blocks is set but method is {config.method}"))
    if config.grow is not None and config.grow.init not in INITS:
        raise ValueError(f"grow.init={config.grow.init!r} is not one of {', '.join(INITS)}")
    if config.grow is not None and not 0 < config.grow.mask_ramp <= 1:
        raise ValueError(f"grow.mask_ramp must be in (0, 1], a share of the steps; got {config.grow.mask_ramp}")
    if config.method == "blocks" and config.grow is not None:
        raise ValueError("method blocks trains layers of the base as it is (no new parameters); set grow=null, or use "
                         "method llama-pro to train the layers a plan adds")
    if t.precision not in PRECISIONS:
        raise ValueError(f"train.precision={t.precision!r} is not one of {', '.join(PRECISIONS)}")
    for key in ("gradient_checkpointing", "fused_adamw"):
        if getattr(t, key) not in (True, False, AUTO):
            raise ValueError(f"train.{key} must be true, false or auto, got {getattr(t, key)!r}")
    if t.loss_chunk is not None and t.loss_chunk < 1:
        raise ValueError(f"train.loss_chunk must be at least 1 token (or null: no chunks), got {t.loss_chunk}")
    for key in ("steps", "global_batch", "micro_batch", "eval_every", "eval_batches", "save_every"):
        if getattr(t, key) < 1:
            raise ValueError(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if not t.lr > 0 or not 0 <= t.warmup < 1 or not 0 <= t.min_lr_ratio <= 1:
        raise ValueError(f"need train.lr > 0, 0 <= train.warmup < 1 and 0 <= train.min_lr_ratio <= 1; got "
                         f"lr={t.lr}, warmup={t.warmup}, min_lr_ratio={t.min_lr_ratio}")
    if config.data.seq_len < 2:
        raise ValueError(f"data.seq_len must be at least 2, got {config.data.seq_len}")
    if config.data.max_examples is not None and config.data.max_examples < 1:
        raise ValueError(f"data.max_examples must be at least 1 (or null: as many as the steps need), got "
                         f"{config.data.max_examples}")
    return config


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ValueError(f"cannot read the override {item!r}; write key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot read the value of the override {item!r} as YAML ({_yaml_problem(e)}); "
                         "quote it or fix its brackets, e.g. blocks=[3,7]") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict; a clear error if it is missing, does not parse, or is not a mapping. A relative
    path missing from the working directory is read from the repository (configs/tiny-cpu.yaml from anywhere)."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (REPO / path).is_file():
        path = REPO / path
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found; the presets are in configs/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _changed(data: dict, defaults: dict, present: tuple[str, ...] = ()) -> dict:
    """The entries of `data` that differ from `defaults`, nested sections compared key by key; a section named in
    `present` is kept (its changes, maybe none) whenever it is there, so that it differs from its absence."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(defaults.get(k), dict):
            sub = _changed(v, defaults[k])
            if sub or k in present:
                out[k] = sub
        elif k not in defaults or v != defaults[k]:
            out[k] = v
    return out


class Whole(dict):
    """A section given whole (`grow={method: dus, drop: 8}`): `merged` puts it in place of the section, not into it."""


def changes_of(overrides: list[str]) -> dict:
    """`a.b=value` overrides (values parsed as YAML) as the nested changes `merged` applies: ["train.lr=1e-4",
    "grow=null"] -> {"train": {"lr": 1e-4}, "grow": None}; a mapping value replaces its section (`Whole`)."""
    changes: dict = {}
    for item in overrides:
        keys, value = parse_override(item)
        value = Whole(value) if isinstance(value, dict) else value
        node = changes
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"cannot set {item!r}: {k} is set to a value above, not a section")
        node[keys[-1]] = value
    return changes


def _merge(data: dict, changes: dict, where: str = "") -> dict:
    out = dict(data)
    for k, v in changes.items():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out[k] = dataclasses.asdict(v)
        elif isinstance(v, dict) and not isinstance(v, Whole) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{where}{k}.")
        elif isinstance(v, dict) and not isinstance(v, Whole) and out.get(k) is not None \
                and not isinstance(out.get(k), dict):
            raise ValueError(f"cannot set {where}{k}.{next(iter(v), '')}: {where}{k} is not a section")
        else:
            out[k] = dict(v) if isinstance(v, Whole) else v
    return out


def merged(config: RunConfig | dict, changes: dict) -> RunConfig:
    """`config` (a RunConfig, or its mapping) with `changes` applied, built and checked: a dict merges into the
    section it names ({"train": {"lr": 1e-4}} changes one key), anything else replaces what is there (None, a
    value, or a whole section as a dataclass, e.g. {"grow": GrowConfig(method="dus", drop=8)}). Every run that
    code makes (reproduce's variants, notebooks, benchmarks) is its preset merged with changes, here."""
    data = config.to_dict() if isinstance(config, RunConfig) else config
    return check(from_dict(_merge(data, changes)))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `a.b=value` overrides (values parsed as YAML), build and check it."""
    return merged(read_yaml(path) if path is not None else {}, changes_of(list(overrides)))


def saved_config(path: str | Path) -> RunConfig:
    """A run folder's config.yaml as a RunConfig; keys it lacks (a run begun before they existed) take their
    defaults, which is what it trained with. A file this version cannot read is a clear error naming it."""
    try:
        return from_dict(yaml.safe_load(Path(path).read_text()) or {})
    except (yaml.YAMLError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as a run config ({e}); was it written by another deepen "
                         f"version?") from None


def from_dict(data: dict) -> RunConfig:
    """A config from its mapping (as `RunConfig.to_dict` writes it); keys left out take their defaults."""
    return _build(RunConfig, data, "")


# Models made here by a run of deepen's own: name -> the run config that pretrains it from scratch.
RECIPES = {"tiny-base": "configs/tiny-base.yaml"}


def recipe(name: str | None) -> RunConfig | None:
    """The run config that makes model `name` when it is built here rather than downloaded, else None.
    "tiny-base": configs/tiny-base.yaml (a small Llama pretrained from scratch on the built-in English), its out
    folder in the cache, one per distinct config, so every notebook and test starts from the same model."""
    if name is None or str(name).lower() not in RECIPES or Path(name).exists():
        return None
    config = load_config(RECIPES[str(name).lower()])
    config.out = str(cache_dir() / f"{name}-{config.key()}")
    return config
