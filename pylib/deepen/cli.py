"""`deepen plan | expand | verify | train | eval | budget | reproduce | grade | demo` — thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import sys

from deepen import plan as plans
from deepen.config import METHODS


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=plans.METHODS,
                        help="llama-pro: zero-initialised copies (function-preserving); dus: SOLAR depth up-scaling; "
                             "idus: interleaved DUS; stack: plain repetition; custom: a layer map (--map)")
    parser.add_argument("--groups", type=int, help="llama-pro: number of equal groups; one or more copies after each")
    parser.add_argument("--copies", type=int, default=1, help="llama-pro: copies of each group's top blocks (default 1)")
    parser.add_argument("--placement", default="interleave", choices=plans.PLACEMENTS,
                        help="llama-pro: new blocks after each group (interleave, the paper), or all at the top or bottom")
    parser.add_argument("--drop", type=int, help="dus/idus: m, layers dropped from each copy (SOLAR: 8 of 32)")
    parser.add_argument("--group", type=int, default=8, help="idus: length of the interleaved runs (default 8)")
    parser.add_argument("--times", type=int, default=2, help="stack: how many times to repeat the layers (default 2)")
    parser.add_argument("--map", help="custom: a layer map such as '0-3,3z,4-7,7z' (z = zero o_proj/down_proj)")


PLAN_KEYS = ("groups", "copies", "placement", "drop", "group", "times", "map")


def plan_from_args(args: argparse.Namespace, n_layers: int) -> plans.Plan:
    return plans.build(args.method, n_layers, **{k: getattr(args, k) for k in PLAN_KEYS})


def cmd_plan(args: argparse.Namespace) -> int:
    plan = plan_from_args(args, args.layers)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan)
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    from deepen.checkpoint import expand, load_config

    plan = plan_from_args(args, load_config(args.src)["num_hidden_layers"])
    print(plan)
    out = expand(args.src, args.out, plan, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                 allow_pickle=args.allow_pickle)
    print(f"wrote {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from deepen.models import resolve
    from deepen.output import read_manifest
    from deepen.verify import verify

    try:
        plan, manifest = read_manifest(args.grown)
    except FileNotFoundError:
        plan, manifest = None, {}
    report = verify(resolve(args.base), args.grown, dtype=args.dtype)
    # a grown model is exact until it is trained; after training it is meant to differ
    must_be_exact = args.exact or (plan is not None and plan.function_preserving and "trained" not in manifest)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    if plan is not None:
        print(f"plan: {plan.method}, {'function-preserving' if plan.function_preserving else 'changes the function'}")
    if must_be_exact and not report.exact:
        print("FAIL: a function-preserving plan must give exactly the base's function", file=sys.stderr)
        return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from deepen.config import load_config
    from deepen.train import read_metrics, train

    from accelerate import PartialState

    overrides = list(args.overrides) + ([f"method={args.method}"] if args.method else [])
    out = train(load_config(args.config, overrides))
    if not PartialState().is_main_process:
        return 0  # under torchrun / accelerate launch: one report
    evals = [r for r in read_metrics(out.parent) if "ppl_general" in r]
    if evals:
        first, last = evals[0], evals[-1]
        print(f"held-out perplexity, step {first['step']} -> {last['step']}: "
              f"general {first['ppl_general']:.2f} -> {last['ppl_general']:.2f}, "
              f"domain {first['ppl_domain']:.2f} -> {last['ppl_domain']:.2f}")
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepen.evaluate import benchmarks, evaluate, headline
    from deepen.train import model_path

    path = model_path(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(args.dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = args.data or ("" if args.tasks else "general,code")
    results = evaluate(model, tokenizer, data.split(","), args.seq_len, args.blocks, args.batch_size) if data else {}
    scores = benchmarks(model, args.tasks, tokenizer=tokenizer, limit=args.limit, num_fewshot=args.num_fewshot,
                        batch_size=args.batch_size, include_path=args.include_path,
                        confirm_run_unsafe_code=args.confirm_run_unsafe_code) if args.tasks else {}
    if args.json:
        print(json.dumps({**results, **scores}, indent=2))
        return 0
    if results:
        print(f"{'corpus':<12} {'perplexity':>12} {'tokens':>10}")
        for corpus, r in results.items():
            print(f"{corpus:<12} {r['perplexity']:>12.2f} {r['tokens']:>10,}")
    if scores:
        print(f"{'task':<28} {'metric':<28} {'value':>8} {'stderr':>8}")
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                name, comma, filt = metric.partition(",")
                if not name.endswith("_stderr"):
                    stderr = metrics.get(f"{name}_stderr{comma}{filt}")
                    print(f"{task:<28} {metric:<28} {value:>8.4f} {'' if stderr is None else f'{stderr:.4f}':>8}")
        papers = headline(scores)
        if "average" in papers:
            print("the papers' metric per task: " + ", ".join(f"{t} {v:.4f}" for t, v in papers.items()
                                                               if t != "average") + f"; average {papers['average']:.4f}")
    return 0


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def cmd_demo(args: argparse.Namespace) -> int:
    from deepen.demo import run

    return run(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepen", description="Make a pretrained decoder LLM deeper without losing what it knows.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print a layer plan (touches no weights)")
    p.add_argument("--layers", type=int, required=True, help="layers in the base model (Llama-2-7B: 32)")
    add_plan_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("expand", help="grow a checkpoint on disk by a plan, streaming shard by shard")
    p.add_argument("src", help="HF model folder or hub id (smollm2 = the offline SmolLM2-135M)")
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    add_plan_args(p)
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 500MB or 5GB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="read pickle .bin checkpoints (runs untrusted code paths)")
    p.set_defaults(func=cmd_expand)

    p = sub.add_parser("verify", help="compare a grown model with its base: exit 1 if a function-preserving plan is not exact")
    p.add_argument("base", help="the base model folder or hub id")
    p.add_argument("grown", help="the grown model folder (with expansion.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype (default float32)")
    p.add_argument("--exact", action="store_true", help="require an exact match even without a manifest")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("train", help="continual pretraining of a run config (resumes from the out folder's checkpoint)")
    p.add_argument("--config", required=True, help="run config (YAML), e.g. configs/tiny-cpu.yaml")
    p.add_argument("--method", choices=METHODS,
                   help="override the config's method: llama-pro (new blocks only), full, lora, blocks (those in blocks=[...])")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50 out=runs/x")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out perplexity of a model per corpus (general: forgetting, domain: gain), "
                                     "and lm-evaluation-harness benchmarks (--tasks)")
    p.add_argument("model", help="model folder, hub id, smollm2 or tiny-base")
    p.add_argument("--data", help="comma-separated corpora: built-ins, files or hub ids "
                                  "(default general,code; none when --tasks is given)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--blocks", type=int, default=64, help="held-out blocks per corpus (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks (or harness requests) per forward (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype (default float32)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cuda when present)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, or a paper's benchmarks: solar (Open LLM "
                                   "Leaderboard six) or llama-pro (those + HumanEval, MBPP); hub datasets need "
                                   "a connection")
    p.add_argument("--limit", type=float, help="--tasks: examples per task (a fraction when < 1), for a quick look")
    p.add_argument("--num-fewshot", type=int, help="--tasks: few-shot examples for every task (default: each "
                                                   "task's or paper's own)")
    p.add_argument("--include-path", action="append", metavar="DIR",
                   help="--tasks: a folder of local task YAMLs (repeatable)")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="--tasks: allow tasks that execute generated code (HumanEval, MBPP)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_eval)

    from deepen import budget

    p = sub.add_parser("budget", help="parameters, FLOPs, memory per GPU and time for a run config, before any GPU")
    budget.add_arguments(p)
    p.set_defaults(func=budget.run)

    from deepen import reproduce

    p = sub.add_parser("reproduce", help="the papers' comparisons on one rung (methods, placement, block count, "
                                         "DUS recovery): CSVs, figures and the claims beside the measurements")
    reproduce.add_arguments(p)
    p.set_defaults(func=reproduce.main)

    from deepen import grade

    p = sub.add_parser("grade", help="run lab notebooks headless; write each exercise's result (JSON, CSV); exit 1 "
                                     "unless all pass")
    grade.add_arguments(p)
    p.set_defaults(func=grade.main)

    p = sub.add_parser("demo", help="the main story on the built-in offline defaults")
    p.add_argument("--out", default="runs/demo", help="where the demo writes its models and results (default runs/demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        print(f"deepen {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
