"""A layer plan is data: for each layer of the grown model, which base layer it comes from and whether its
output projections (`o_proj`, `down_proj`) are zeroed. Functions here only *build* plans; they touch no weights.

    >>> print(llama_pro(8, groups=2))
    llama-pro(n_layers=8, groups=2, copies=1, placement=interleave): 8 -> 10 layers, 2 new, function-preserving
      0 1 2 3 [3] 4 5 6 7 [7]
      [k] new copy of layer k with o_proj and down_proj zeroed; (k) new plain copy of layer k
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Layer:
    source: int  # index of the base layer this one is copied from
    new: bool = False  # added by the plan (the first use of a base layer is the original; later uses are new)
    zero: bool = False  # o_proj and down_proj zeroed: the block adds exactly 0 to the residual stream

    def __str__(self) -> str:
        return f"[{self.source}]" if self.zero else f"({self.source})" if self.new else str(self.source)


@dataclass(frozen=True)
class Plan:
    n_base: int
    layers: tuple[Layer, ...]
    method: str = "custom"
    args: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.n_base < 1:
            raise ValueError(f"a plan needs a base with at least 1 layer, got n_base={self.n_base}")
        if not self.layers:
            raise ValueError("a plan needs at least one layer")
        bad = [layer.source for layer in self.layers if not 0 <= layer.source < self.n_base]
        if bad:
            raise ValueError(f"layer sources {bad} are outside the base's layers 0..{self.n_base - 1}")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def sources(self) -> list[int]:
        return [layer.source for layer in self.layers]

    @property
    def new_layers(self) -> list[int]:
        """Indices (in the grown model) of the layers the plan adds."""
        return [i for i, layer in enumerate(self.layers) if layer.new]

    @property
    def zeroed_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.zero]

    @property
    def function_preserving(self) -> bool:
        """True when the grown model computes exactly the base's function: the blocks that are not zeroed
        are the base's blocks, each once, in order (a zeroed block adds exactly 0 to the residual stream)."""
        return [layer.source for layer in self.layers if not layer.zero] == list(range(self.n_base))

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in {"n_layers": self.n_base, **self.args}.items())
        kind = "function-preserving" if self.function_preserving else "changes the function"
        legend = "[k] new copy of layer k with o_proj and down_proj zeroed; (k) new plain copy of layer k"
        return (f"{self.method}({args}): {self.n_base} -> {self.n_layers} layers, {len(self.new_layers)} new, {kind}\n"
                f"  {' '.join(map(str, self.layers))}\n  {legend}")

    __str__ = describe

    def to_dict(self) -> dict:
        return {"method": self.method, "args": self.args, "n_base": self.n_base, "n_layers": self.n_layers,
                "sources": self.sources, "new": self.new_layers, "zeroed": self.zeroed_layers,
                "function_preserving": self.function_preserving}

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        new, zeroed = set(d["new"]), set(d["zeroed"])
        layers = tuple(Layer(s, i in new, i in zeroed) for i, s in enumerate(d["sources"]))
        return cls(d["n_base"], layers, d.get("method", "custom"), dict(d.get("args", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


def _mark_new(n_base: int, sources: list[int], zero: set[int] = frozenset()) -> tuple[Layer, ...]:
    """The first use of each base layer is the original; every later use is new."""
    seen: set[int] = set()
    layers = []
    for i, s in enumerate(sources):
        layers.append(Layer(s, new=s in seen or i in zero, zero=i in zero))
        seen.add(s)
    return tuple(layers)


def _check_layers(n_layers: int) -> None:
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}")


def _divisors(n: int) -> str:
    ds = [str(d) for d in range(1, n + 1) if n % d == 0]
    return ", ".join(ds[:-1]) + " or " + ds[-1] if len(ds) > 1 else ds[0]


PLACEMENTS = ("interleave", "top", "bottom")


def llama_pro(n_layers: int, groups: int, copies: int = 1, placement: str = "interleave") -> Plan:
    """LLaMA Pro (arXiv 2401.02415): split the layers into `groups` equal groups; after each group add copies
    of its top `copies` blocks with o_proj and down_proj zeroed. `placement="top" | "bottom"` puts the same new
    blocks all above or all below the base's layers (the paper's placement ablation)."""
    _check_layers(n_layers)
    if not isinstance(groups, int) or groups < 1 or n_layers % groups:
        raise ValueError(f"groups={groups} does not divide {n_layers} layers; try {_divisors(n_layers)}")
    size = n_layers // groups
    if not isinstance(copies, int) or not 1 <= copies <= size:
        raise ValueError(f"copies={copies} must be between 1 and the group size {size} ({n_layers} layers / {groups} groups)")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
    copied = [g * size + j for g in range(groups) for j in range(size - copies, size)]
    new = [Layer(s, new=True, zero=True) for s in copied]
    base = [Layer(s) for s in range(n_layers)]
    if placement == "top":
        layers = base + new
    elif placement == "bottom":
        layers = new + base
    else:
        layers = []
        for g in range(groups):
            layers += base[g * size:(g + 1) * size] + new[g * copies:(g + 1) * copies]
    return Plan(n_layers, tuple(layers), "llama-pro", {"groups": groups, "copies": copies, "placement": placement})


def dus(n_layers: int, drop: int) -> Plan:
    """SOLAR depth up-scaling (arXiv 2312.15166): layers [0, L-m) followed by layers [m, L), 2(L-m) in all."""
    _check_layers(n_layers)
    if not isinstance(drop, int) or not 0 <= drop < n_layers / 2:
        raise ValueError(f"drop={drop} must be in 0..{(n_layers - 1) // 2} for {n_layers} layers "
                         f"(SOLAR: 32 layers, drop 8 -> 48; drop 0 stacks the model twice)")
    sources = list(range(n_layers - drop)) + list(range(drop, n_layers))
    return Plan(n_layers, _mark_new(n_layers, sources), "dus", {"drop": drop})


def idus(n_layers: int, drop: int, group: int = 8) -> Plan:
    """Interleaved DUS: the two halves of DUS, A = [0, L-m) and B = [m, L), interleaved in runs of `group`
    layers: A[0:g], B[0:g], A[g:2g], B[g:2g], ... group=1 alternates single layers."""
    base = dus(n_layers, drop)
    half = n_layers - drop
    if not isinstance(group, int) or group < 1 or half % group:
        raise ValueError(f"group={group} does not divide the {half} layers of each half; try {_divisors(half)}")
    a, b = base.sources[:half], base.sources[half:]
    sources = [s for i in range(0, half, group) for s in a[i:i + group] + b[i:i + group]]
    return Plan(n_layers, _mark_new(n_layers, sources), "idus", {"drop": drop, "group": group})


def stack(n_layers: int, times: int = 2) -> Plan:
    """Plain repetition: layers [0, L) `times` times over."""
    _check_layers(n_layers)
    if not isinstance(times, int) or times < 1:
        raise ValueError(f"times={times} must be a positive integer")
    return Plan(n_layers, _mark_new(n_layers, list(range(n_layers)) * times), "stack", {"times": times})


_ITEM = re.compile(r"^(\d+)(?:-(\d+))?(z?)$")


def custom(spec: str | list, n_base: int | None = None) -> Plan:
    """Any plan, by hand: a list of base-layer indices (or Layer objects), or a string such as
    "0-3,3z,4-7,7z" where a-b is a range and a trailing z zeroes that copy's o_proj and down_proj."""
    if isinstance(spec, str):
        sources, zero = [], set()
        for item in spec.replace(" ", "").split(","):
            m = _ITEM.match(item)
            if not m:
                raise ValueError(f"cannot read {item!r} in the layer map {spec!r}; write e.g. '0-3,3z,4-7,7z'")
            lo, hi = int(m[1]), int(m[2] or m[1])
            if m[3]:
                zero.update(range(len(sources), len(sources) + hi - lo + 1))
            sources += list(range(lo, hi + 1))
    else:
        items = list(spec)
        sources = [x.source if isinstance(x, Layer) else int(x) for x in items]
        zero = {i for i, x in enumerate(items) if isinstance(x, Layer) and x.zero}
    if not sources:
        raise ValueError("a custom plan needs at least one layer")
    n = n_base if n_base is not None else max(sources) + 1
    return Plan(n, _mark_new(n, sources, zero), "custom", {"spec": spec if isinstance(spec, str) else sources})


@dataclass(frozen=True)
class Arg:
    """One argument of a plan builder, declared once: the config's `grow.<name>`, the CLI's `--<name>` and the plan
    explorer's control are made from it."""

    name: str
    type: type
    default: object
    help: str
    required: bool = False  # the builder cannot do without it (then default is None)
    choices: tuple | None = None


@dataclass(frozen=True)
class Builder:
    """A plan builder and the arguments it reads (beyond the base's layer count)."""

    build: object  # (n_layers, **args) -> Plan
    args: tuple[Arg, ...]
    help: str


GROUPS = Arg("groups", int, None, "llama-pro: number of equal groups; copies of each group's top blocks after it",
             required=True)
COPIES = Arg("copies", int, 1, "llama-pro: copies of each group's top blocks (default 1)")
PLACEMENT = Arg("placement", str, "interleave", "llama-pro: new blocks after each group (interleave, the paper), or "
                "all at the top or bottom", choices=PLACEMENTS)
DROP = Arg("drop", int, None, "dus/idus: m, layers dropped from each copy (SOLAR: 8 of 32)", required=True)
GROUP = Arg("group", int, 8, "idus: length of the interleaved runs (default 8)")
TIMES = Arg("times", int, 2, "stack: how many times to repeat the layers (default 2)")
MAP = Arg("map", str, None, "custom: a layer map such as '0-3,3z,4-7,7z' (z = zero o_proj/down_proj)", required=True)

# The one registry of plans: name -> builder and its arguments.
PLANS = {
    "llama-pro": Builder(llama_pro, (GROUPS, COPIES, PLACEMENT), "zero-initialised copies (function-preserving)"),
    "dus": Builder(dus, (DROP,), "SOLAR depth up-scaling"),
    "idus": Builder(idus, (DROP, GROUP), "interleaved DUS"),
    "stack": Builder(stack, (TIMES,), "plain repetition"),
    "custom": Builder(lambda n_layers, map: custom(map, n_base=n_layers), (MAP,), "a layer map by hand"),
}
PLAN_METHODS = tuple(PLANS)
PLAN_ARGS = tuple({a.name: a for builder in PLANS.values() for a in builder.args}.values())  # each name once


def build(method: str, n_layers: int, **args) -> Plan:
    """Any plan by name (PLANS), given the arguments its builder reads; the others may be passed and are ignored
    (a config's `grow:` section holds every argument)."""
    if method not in PLANS:
        raise ValueError(f"method={method!r} is not one of {', '.join(PLAN_METHODS)}")
    builder = PLANS[method]
    unknown = set(args) - {a.name for a in PLAN_ARGS}
    if unknown:
        raise ValueError(f"unknown plan argument(s) {', '.join(sorted(unknown))}; plans take "
                         f"{', '.join(a.name for a in PLAN_ARGS)}")
    missing = [a.name for a in builder.args if a.required and args.get(a.name) is None]
    if missing:
        raise ValueError(f"method {method} needs {' and '.join(missing)}")
    return builder.build(n_layers, **{a.name: args[a.name] if args.get(a.name) is not None else a.default
                                      for a in builder.args})
