"""ipywidgets explorers for the notebooks. Each one starts from defaults that make sense without a browser:
its text form (what a static viewer or a headless run shows) is the result for the current settings, and the
explorers that draw keep the figure for those settings.

    >>> explorer = plan_explorer()      # in a notebook: the controls and the live layer map
    >>> print(explorer.summary)         # the same result as text
    >>> attention_explorer().figure     # the attention heatmap and the RoPE curve at the default settings

- `plan_explorer`: method, layers, groups, copies, placement -> layer map, parameters, trainable share and
  memory per GPU (`deepen.budget`, on the meta device, so a 7B shape costs nothing);
- `attention_explorer`: a real model on a real sentence -> each head's attention, and how the rotary score of
  identical q and k falls off with distance (`deepen.llama.rope`);
- `results_explorer`: the continual-pretraining runs under a folder -> curves of any metric, forgetting vs gain.
"""

from __future__ import annotations

import base64
import html
import io
import math
import tempfile
from functools import lru_cache
from pathlib import Path

import ipywidgets as widgets
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM

from deepen import REPO, llama
from deepen import budget as B
from deepen.config import DataConfig, GrowConfig, RunConfig, TrainConfig
from deepen.llama import PRESETS
from deepen.plan import PLACEMENTS, PLAN_METHODS, PLANS, Plan, build
from deepen.runs import find_runs
from deepen.train import model_folder, tiny_base

STYLE = {"description_width": "90px"}
USES = {name: tuple(a.name for a in builder.args) for name, builder in PLANS.items()}  # what each plan reads


class Explorer(widgets.VBox):
    """Controls plus the result for the current settings: `summary` (text) and, where there is one, `figure`
    (a matplotlib Figure). Saved without a kernel, a notebook still shows both."""

    summary: str = ""
    figure: Figure | None = None
    _png: bytes = b""

    def _draw(self, fig: Figure | None) -> None:
        """Keep `fig` as the figure and show it in the image widget."""
        self.figure = fig
        if fig is None:
            self._png = b""
        else:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=90)  # constrained layout: no second, "tight" draw
            self._png = buffer.getvalue()
        self.image.value = self._png
        self.image.layout.display = None if self._png else "none"

    def _repr_mimebundle_(self, **kwargs):
        bundle = {**super()._repr_mimebundle_(**kwargs), "text/plain": self.summary}
        if self._png:
            bundle["image/png"] = base64.b64encode(self._png).decode()
        return bundle


def dropdown(name, options, value, description=None):
    return widgets.Dropdown(options=options, value=value, description=description or name, style=STYLE)


def slider(name, value, lo, hi, description=None):
    return widgets.IntSlider(value=value, min=lo, max=hi, description=description or name, style=STYLE,
                             continuous_update=False)


# ---------------------------------------------------------------------------------------------------------------
# Plans: layer map, parameters, trainable share, memory per GPU


@lru_cache
def shape_counts(shape: str) -> tuple[int, int]:
    """(parameters per decoder block, parameters outside the blocks) of a `deepen.llama.PRESETS` shape, counted
    on the meta device (no memory): a 2-block model minus a 1-block model is one block."""
    counts = []
    for n in (1, 2):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(PRESETS[shape].replace(n_layers=n).to_hf())
        counts.append(sum(p.numel() for p in model.parameters()))
    block = counts[1] - counts[0]
    return block, counts[0] - block


def plan_summary(plan: Plan, shape: str) -> str:
    """The layer map and the parameter counts of `plan` applied to a model of `shape`."""
    block, rest = shape_counts(shape)
    base, grown = rest + plan.n_base * block, rest + plan.n_layers * block
    new = len(plan.new_layers) * block
    trainable = "trainable in LLaMA Pro (new blocks only)" if plan.function_preserving else "added by the plan"
    return (f"{plan}\n\n"
            f"{shape} shape (deepen.llama.PRESETS), {block:,} parameters per block\n"
            f"  base   {plan.n_base:3d} blocks  {base:>16,}\n"
            f"  grown  {plan.n_layers:3d} blocks  {grown:>16,}  ({grown / base - 1:+.1%})\n"
            f"  new    {len(plan.new_layers):3d} blocks  {new:>16,}  {trainable}, {new / grown:.1%} of the grown model")


# What the memory estimate assumes: the LLaMA Pro paper's run (configs/llama2-7b-pro.yaml) on 80 GB GPUs.
TRAINING = {"seq_len": 4096, "micro_batch": 4, "global_batch": 1024, "precision": "bf16", "checkpointing": True,
            "gpu_memory": 80.0, "strategy": "fsdp"}


@lru_cache
def shape_folder(shape: str, layers: int) -> str:
    """A folder holding only the config.json of `shape` with `layers` blocks: what `deepen.budget` reads."""
    folder = Path(_shape_root().name, f"{shape}-{layers}")
    PRESETS[shape].replace(n_layers=layers).to_hf().save_pretrained(folder)
    return str(folder)


@lru_cache
def _shape_root() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="deepen-shapes-")  # removed when the interpreter exits


def plan_memory(shape: str, layers: int, grow: dict, gpus: int) -> str:
    """Memory per GPU to train `shape` with `layers` blocks grown by `grow` (a run config's `grow:` keys), only
    the new blocks (LLaMA Pro) vs every parameter (full), by `deepen.budget` on the meta device, with the
    `TRAINING` settings."""
    t = TRAINING
    run = RunConfig(model=shape_folder(shape, layers), method="llama-pro", grow=GrowConfig(**grow),
                    data=DataConfig(seq_len=t["seq_len"]),
                    train=TrainConfig(global_batch=t["global_batch"], micro_batch=t["micro_batch"],
                                      precision=t["precision"], gradient_checkpointing=t["checkpointing"]))
    lines = [f"memory per GPU on {gpus} x {t['gpu_memory']:.0f} GB ({t['strategy']}, {t['precision']}, "
             f"{t['micro_batch']} x {t['seq_len']} tokens per micro-batch, activation checkpointing; deepen.budget)"]
    for method, label in (("llama-pro", "new blocks only"), ("full", "every parameter")):
        b = B.budget(run, gpus=gpus, gpu_memory=t["gpu_memory"], strategy=t["strategy"], method=method)
        verdict = "fits" if b.fits else f"does not fit (planned share {B.USABLE:.0%} of {t['gpu_memory']:.0f} GB)"
        lines.append(f"  {label:16s} {b.trainable:>16,} trainable  {b.memory_total / B.GB:7.1f} GB  {verdict}")
    return "\n".join(lines)


def plan_diagram(plan: Plan) -> str:
    """The layer map as a row of boxes (HTML), bottom layer first: base blocks grey, zeroed copies orange,
    plain copies green; each box shows its source layer."""
    colours = {"base": "#d5dbe3", "zeroed": "#f28e2b", "copy": "#59a14f"}
    boxes = []
    for i, layer in enumerate(plan.layers):
        kind = "zeroed" if layer.zero else "copy" if layer.new else "base"
        boxes.append(f'<span title="layer {i}: {kind} of base layer {layer.source}" style="display:inline-block;'
                     f'min-width:1.8em;margin:1px;padding:2px 0;text-align:center;font:11px monospace;'
                     f'background:{colours[kind]}">{layer.source}</span>')
    legend = " ".join(f'<span style="background:{c};padding:0 6px">{k}</span>' for k, c in colours.items())
    return f'<div style="display:flex;flex-wrap:wrap;max-width:60em">{"".join(boxes)}</div><div>{legend}</div>'


class PlanExplorer(Explorer):
    """Controls over a live layer map, parameter counts and memory per GPU; each method reads only its own
    controls (the others are greyed out), with the arguments of `deepen.plan.build`."""

    def __init__(self, method="llama-pro", shape="llama2-7b", layers=None, groups=8, copies=1,
                 placement="interleave", drop=8, group=8, times=2, map=None, gpus=8):
        n = layers or PRESETS[shape].n_layers
        half = n // 2
        map = map or f"0-{half - 1},{half - 1}z,{half}-{n - 1},{n - 1}z"  # two halves, a zeroed copy after each
        self.controls = {
            "method": dropdown("method", list(PLAN_METHODS), method),
            "shape": dropdown("shape", list(PRESETS), shape),
            "layers": slider("layers", n, 1, 96),
            "groups": slider("groups", groups, 1, 96),
            "copies": slider("copies", copies, 1, 8),
            "placement": dropdown("placement", list(PLACEMENTS), placement),
            "drop": slider("drop", drop, 0, 48),
            "group": slider("group", group, 1, 48),
            "times": slider("times", times, 1, 4),
            "map": widgets.Text(value=map, description="map", style=STYLE, continuous_update=False),
            "gpus": dropdown("gpus", [1, 2, 4, 8, 16, 32, 64], gpus, "GPUs (80 GB)"),
        }
        self.diagram, self.output, self.image = widgets.HTML(), widgets.HTML(), widgets.Image()
        boxes = list(self.controls.values())
        super().__init__([widgets.HBox([widgets.VBox(boxes[:6]), widgets.VBox(boxes[6:])]), self.diagram,
                          self.output])
        self.controls["shape"].observe(self._shape_changed, "value")
        self.controls["layers"].observe(lambda change: self._fit_to(change["new"]), "value")
        self._fit_to(n)
        for control in boxes:
            control.observe(lambda _: self._update(), "value")
        self._update()

    def _shape_changed(self, change) -> None:
        self.controls["layers"].value = PRESETS[change["new"]].n_layers

    def _fit_to(self, layers: int) -> None:
        """Sliders that only offer what n layers allow: DUS drops 0 .. (n-1)//2, a half holds n//2 layers."""
        for name, top in (("drop", max(0, (layers - 1) // 2)), ("group", max(1, layers // 2))):
            control = self.controls[name]
            control.value = min(control.value, top)
            control.max = top

    def _update(self) -> None:
        values = {k: c.value for k, c in self.controls.items()}
        uses = USES[values["method"]]
        for name in {name for args in USES.values() for name in args}:
            self.controls[name].disabled = name not in uses
        try:
            args = {k: values[k] for k in uses}
            plan = build(values["method"], values["layers"], **args)
            memory = plan_memory(values["shape"], values["layers"], {"method": values["method"], **args},
                                 values["gpus"])
            self.plan, self.summary = plan, f"{plan_summary(plan, values['shape'])}\n\n{memory}"
        except ValueError as error:  # the plan's own message names the fix
            self.plan, self.summary = None, f"no plan: {error}"
        self.diagram.value = plan_diagram(self.plan) if self.plan else ""
        self.output.value = f"<pre>{html.escape(self.summary)}</pre>"


def plan_explorer(**defaults) -> PlanExplorer:
    """Pick method, model shape, layers, groups, copies, placement, drop (and idus's group, stack's times,
    custom's map) and a GPU count; see the layer map, the parameter counts, the trainable share and the memory
    per GPU. Keyword arguments set the starting values (defaults: LLaMA Pro on the Llama-2-7B shape, 8 groups
    -> 40 blocks, 8 GPUs)."""
    return PlanExplorer(**defaults)


# ---------------------------------------------------------------------------------------------------------------
# Attention on a real sentence, and RoPE


SENTENCE = "The cat sat on the mat because the mat was warm, and the cat was cold."


def load_model(model=None, tokenizer=None):
    """(model, tokenizer, name): None -> the tiny English base (`deepen.train.tiny_base`); a folder, hub id or
    "smollm2" -> loaded from there; a model -> itself, with `tokenizer` or the one saved beside its weights."""
    from transformers import AutoTokenizer

    if model is None:
        model, tokenizer = tiny_base()
        return model, tokenizer, "tiny base"
    if isinstance(model, (str, Path)):
        path = model_folder(str(model))  # "tiny-base", "smollm2", a folder or a hub id
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    name = Path(model.name_or_path).name or type(model).__name__
    return model, tokenizer or AutoTokenizer.from_pretrained(model.name_or_path), name


@torch.no_grad()
def attention_weights(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(layers, heads, seq, seq) attention weights of `model` (transformers' eager attention, which returns
    them) on input_ids (1, seq); the model's attention implementation is restored afterwards."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids.to(model.device), output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    return torch.stack([a[0] for a in out.attentions]).float().cpu()


def rope_scores(head_dim: int, theta: float, distances: int, pair: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary score <R_d q, R_0 q> / |q|² of a query and a key that are the same vector q, at distance d = 0 ..
    distances: q = all ones (every pair) and q = ones on `pair` only. Both through `deepen.llama.rope`."""
    cos, sin = llama.rope(torch.arange(distances + 1), head_dim, theta)  # (distances + 1, head_dim)
    one_pair = torch.zeros(head_dim)
    one_pair[[pair, pair + head_dim // 2]] = 1.0  # pair i = (x_i, x_{i + d/2}), transformers' layout
    out = []
    for q in (torch.ones(head_dim), one_pair):
        rotated = llama.apply_rope(q, cos, sin)  # (distances + 1, head_dim): q at every position
        out.append(rotated @ rotated[0] / (q @ q))
    return out[0], out[1]


class AttentionExplorer(Explorer):
    """Pick a block and a head: its attention over the sentence's tokens; pick a rotary pair and a distance:
    how the score of identical q and k turns with distance, for that pair and for all pairs together."""

    def __init__(self, text: str = SENTENCE, model=None, tokenizer=None, layer=None, head=0, pair=0,
                 distance=16):
        model, tokenizer, self.name = load_model(model, tokenizer)
        config = llama.Config.from_hf(model.config)
        self.config, self.text = config, text
        ids = tokenizer(text, return_tensors="pt").input_ids
        self.tokens = [tokenizer.decode(t) for t in ids[0]]
        self.weights = attention_weights(model, ids)  # (layers, heads, seq, seq)
        self.controls = {
            "layer": slider("layer", config.n_layers // 2 if layer is None else layer, 0, config.n_layers - 1,
                            "block"),
            "head": slider("head", head, 0, config.n_heads - 1),
            "pair": slider("pair", pair, 0, config.head_dim // 2 - 1, "RoPE pair i"),
            "distance": slider("distance", distance, 1, min(config.max_seq_len, 4096), "distance"),
        }
        self.output, self.image = widgets.HTML(), widgets.Image()
        super().__init__([widgets.HBox(list(self.controls.values())[:2]),
                          widgets.HBox(list(self.controls.values())[2:]), self.image, self.output])
        for control in self.controls.values():
            control.observe(lambda _: self._update(), "value")
        self._update()

    def _update(self) -> None:
        layer, head, pair, distance = (self.controls[k].value for k in ("layer", "head", "pair", "distance"))
        c = self.config
        pattern = self.weights[layer, head]  # (seq, seq): row = query token, column = key token
        span = max(32, 4 * distance)
        every, single = rope_scores(c.head_dim, c.rope_theta, span, pair)
        self.rope = pd.DataFrame({"distance": range(span + 1), "all pairs (q = k = 1)": every.numpy(),
                                  f"pair {pair} only": single.numpy()})

        fig = Figure(figsize=(14, 6), layout="constrained")
        left, right = fig.subplots(1, 2, width_ratios=[1.15, 1])
        sns.heatmap(pattern.numpy(), ax=left, cmap="rocket_r", vmin=0, vmax=1, square=True,
                    xticklabels=self.tokens, yticklabels=self.tokens, cbar_kws={"label": "attention weight"})
        left.set(title=f"{self.name}: block {layer}, head {head}", xlabel="key token (read)",
                 ylabel="query token (reading)")
        left.tick_params(labelsize=8)
        sns.lineplot(data=self.rope.melt("distance", var_name="q = k", value_name="score"), x="distance",
                     y="score", hue="q = k", ax=right)
        right.axvline(distance, color="grey", ls="--", lw=1)
        wavelength = 2 * math.pi * c.rope_theta ** (2 * pair / c.head_dim)  # tokens per turn of pair i
        if wavelength < span / 40:  # too many turns to draw as a line: say what the band is
            right.text(0.02, 0.04, f"pair {pair} turns once every {wavelength:,.1f} tokens: at this range its curve is "
                       f"a band\n(lower the distance, or pick a higher pair, to see the cosine)",
                       transform=right.transAxes, fontsize=8, va="bottom",
                       bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        sns.move_legend(right, "upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, title=None, frameon=False)
        right.set(title=f"RoPE: score of identical q, k (head_dim {c.head_dim}, theta {c.rope_theta:,.0f})",
                  xlabel="distance m - n (tokens)", ylabel=r"$\langle R_m q, R_n q\rangle \,/\, \|q\|^2$")
        self._draw(fig)

        top = pattern.argmax(-1)
        rows = [f"  {self.tokens[i]!r:>14} -> {self.tokens[j]!r:<14} {pattern[i, j]:.2f}"
                for i, j in enumerate(top.tolist())]
        sink = pattern[1:, 0].mean().item() if len(self.tokens) > 1 else 1.0
        self.summary = "\n".join([
            f"{self.name} ({c.n_layers} blocks x {c.n_heads} heads), {len(self.tokens)} tokens of {self.text!r}",
            f"block {layer}, head {head}: the token each token attends to most (weight)", *rows,
            f"  average weight on the first token (tokens 1..): {sink:.2f}",
            f"RoPE, identical q and k at distance {distance}: all pairs {every[distance]:+.3f}, "
            f"pair {pair} {single[distance]:+.3f} (1 at distance 0)",
        ])
        self.output.value = f"<pre>{html.escape(self.summary)}</pre>"


def attention_explorer(text: str = SENTENCE, model=None, tokenizer=None, **defaults) -> AttentionExplorer:
    """Attention of a real model on `text`, one heatmap per block and head (tokens as tick labels), next to
    RoPE's score of identical q and k against distance. model: None (the tiny English base, trained once and
    cached), "smollm2", a folder or hub id, or a loaded transformers Llama-family model (give its tokenizer, or
    it is loaded from the model's folder). defaults: layer (middle block), head (0), pair (0), distance (16)."""
    return AttentionExplorer(text, model, tokenizer, **defaults)


# ---------------------------------------------------------------------------------------------------------------
# Results of continual-pretraining runs


METRICS = ("loss", "ppl_general", "ppl_domain", "lr", "tokens_per_s")
NO_RUNS = ("no runs under {root}: no metrics.jsonl found; run `make reproduce` or "
           "`deepen train --config configs/tiny-cpu.yaml` first")


def grow_label(config: RunConfig) -> str:
    """"llama-pro(groups=2, copies=1, placement=interleave)" from a run's config; "none" without a grow."""
    grow = config.grow
    if grow is None:
        return "none"
    return f"{grow.method}({', '.join(f'{k}={getattr(grow, k)}' for k in USES.get(grow.method, ()) if getattr(grow, k) is not None)})"


def _on_domain(label: str, config: RunConfig) -> str:
    domain = config.data.domain
    return f"{label}, on {domain}" if domain != "code" else label  # code: the built-in default domain


def method_label(config: RunConfig) -> str:
    """The run's method, with the domain it trained on when that is not the built-in code (a recovery run on
    English is not coloured with the code runs)."""
    return _on_domain(config.method, config)


def setting_label(config: RunConfig) -> str:
    """What a run trains, without its seed: the method (with LoRA's rank or the blocks it trains) and the grow,
    e.g. "llama-pro, grow llama-pro(groups=2, copies=1, placement=interleave)"; runs that differ only in their
    seed share it."""
    method = config.method
    if method == "lora":
        method += f" r={config.lora.r}"
    if method == "blocks":
        method += f" {config.blocks}"
    grow = grow_label(config)
    return _on_domain(method if grow == "none" else f"{method}, grow {grow}", config)


def runs_folder(runs: str | Path) -> Path:
    """`runs` as given; a relative path that is not in the working directory is read from the repository (a
    notebook runs in notebooks/, `make reproduce` writes runs/reproduce at the top)."""
    path = Path(runs)
    if not path.is_absolute() and not path.exists() and (REPO / "pyproject.toml").is_file() and (REPO / path).exists():
        return REPO / path
    return path


def read_runs(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records, runs) of every run under `root` (a folder holding metrics.jsonl, written by deepen.train.train).
    records: one row per logged step, with the run's name (its folder relative to root), method, grow and
    setting (`setting_label`: what the run trains, without its seed);
    runs: one row per run with its final numbers, forgetting and gain as deepen.runs defines them (against the
    base). A partly written last line (a run in progress) is skipped."""
    root = Path(root)
    records, runs = [], []
    for result in find_runs(root):
        name = result.folder.relative_to(root).as_posix() if result.folder != root else root.name
        run = {"run": name, "method": method_label(result.config), "grow": grow_label(result.config),
               "setting": setting_label(result.config)}
        records.append(pd.DataFrame([{**run, **record} for record in result.records]))
        runs.append({**run, "steps": result.steps, "tokens": result.tokens, "loss": result.final_loss,
                     "ppl_general base": result.base_general, "ppl_general after": result.last["ppl_general"],
                     "ppl_domain base": result.base_domain, "ppl_domain after": result.last["ppl_domain"],
                     "forgetting": result.forgetting, "gain": result.gain})
    return (pd.concat(records, ignore_index=True) if records else pd.DataFrame()), pd.DataFrame(runs)


class ResultsExplorer(Explorer):
    """Pick runs, a metric and the x axis: one curve per run (or per method, grow or setting: runs that share it,
    e.g. the seeds of one setting, are averaged, with a band); or every run's forgetting against its gain."""

    def __init__(self, runs: str | Path = "runs/reproduce", metric="loss", x="step", by="run", view="curves"):
        self.root, self.shown = runs_folder(runs), Path(runs)  # shown: as given, no machine's path in a notebook
        self.records, self.runs = read_runs(self.root)
        names = list(self.runs["run"]) if len(self.runs) else []
        self.controls = {
            "runs": widgets.SelectMultiple(options=names, value=names, rows=min(max(len(names), 2), 8),
                                           description="runs", style=STYLE),
            "view": widgets.ToggleButtons(options=["curves", "forgetting vs gain"], value=view, description="view",
                                          style=STYLE),
            "metric": dropdown("metric", list(METRICS), metric),
            "x": widgets.ToggleButtons(options=["step", "tokens"], value=x, description="x axis", style=STYLE),
            "by": dropdown("by", ["run", "setting", "method", "grow"], by, "colour by"),
        }
        self.output, self.image = widgets.HTML(), widgets.Image()
        controls = list(self.controls.values())
        super().__init__([widgets.HBox([controls[0], widgets.VBox(controls[1:])]), self.image, self.output])
        for control in controls:
            control.observe(lambda _: self._update(), "value")
        self._update()

    def _update(self) -> None:
        if not len(self.runs):
            self.data, self.summary = pd.DataFrame(), NO_RUNS.format(root=self.shown)
            self._draw(None)
            self.output.value = f"<pre>{html.escape(self.summary)}</pre>"
            return
        v = {k: c.value for k, c in self.controls.items()}
        self.controls["metric"].disabled = self.controls["x"].disabled = v["view"] != "curves"
        chosen = self.runs[self.runs["run"].isin(v["runs"])]
        table = chosen.drop(columns=["method", "grow", "setting"]).set_index("run")
        self.summary = (f"{len(chosen)} of {len(self.runs)} runs under {self.shown}, final numbers; forgetting = "
                        f"general ppl after / the base's, gain = the base's domain ppl / after\n"
                        + table.to_string(float_format=lambda f: f"{f:,.0f}" if abs(f) >= 1000 else f"{f:.3g}"))
        fig = Figure(figsize=(11, 5), layout="constrained")
        ax = fig.subplots()
        if v["view"] == "curves":
            records = self.records[self.records["run"].isin(v["runs"])]
            self.data = records[["run", "method", "grow", "setting", v["x"], v["metric"]]].dropna() \
                if v["metric"] in records else pd.DataFrame()
            if len(self.data):
                sns.lineplot(data=self.data, x=v["x"], y=v["metric"], hue=v["by"],
                             marker="o" if v["metric"].startswith("ppl") else None, ax=ax)
                if v["metric"].startswith("ppl"):
                    ax.set_yscale("log")
            ax.set(title=f"{v['metric']} against {v['x']}", xlabel=v["x"], ylabel=v["metric"])
        else:
            self.data = chosen.dropna(subset=["forgetting", "gain"])
            x, y = "forgetting", "gain"  # as in every figure of forgetting against gain: upper left is better
            if len(self.data):
                sns.scatterplot(data=self.data, x=x, y=y, hue=v["by"], s=80, ax=ax)
                for _, row in self.data.iterrows():
                    ax.annotate(row["run"], (row[x], row[y]), textcoords="offset points", xytext=(5, 5), fontsize=8)
            ax.axvline(1, color="grey", ls="--", lw=1)
            ax.set(xscale="log", yscale="log", title="Gain against forgetting per run (upper left is better)",
                   xlabel="forgetting: general perplexity after / the base's",
                   ylabel="gain: the base's domain perplexity / after")
        if ax.get_legend() is not None:  # beside the plot, never over the curves
            entries = len(ax.get_legend().get_texts())
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), ncol=1 if entries <= 14 else 2,
                            fontsize=8 if entries <= 14 else 6, title=v["by"], frameon=False)
        self._draw(fig)
        self.output.value = f'<pre style="white-space:pre;overflow-x:auto">{html.escape(self.summary)}</pre>'


def results_explorer(runs: str | Path = "runs/reproduce", **defaults) -> ResultsExplorer:
    """Every continual-pretraining run under the folder `runs` (each a folder with config.yaml and metrics.jsonl
    from `deepen train`): pick runs, a metric (loss, ppl_general, ppl_domain, lr, tokens_per_s) and the x axis
    (step or tokens) for a line plot, or view forgetting (general perplexity after / the base's) against gain
    (the base's domain perplexity / after). The text form is the table of final numbers per run. A relative `runs` missing
    from the working directory is read from the repository. defaults: metric ("loss"), x ("step"), by ("run",
    "setting", "method" or "grow"), view ("curves" or "forgetting vs gain")."""
    return ResultsExplorer(runs, **defaults)
