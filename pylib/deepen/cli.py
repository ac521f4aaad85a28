"""`deepen plan | expand | verify | train | sft | dpo | merge | eval | budget | reproduce | grade | handout | demo` —
thin wrappers over the library."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from accelerate import PartialState

from deepen import budget, grade, reproduce
from deepen import plan as plans
from deepen.checkpoint import expand, read_hf_config
from deepen.config import TRAIN_METHODS, load_config
from deepen.demo import run as run_demo
from deepen.dpo import run_dpo
from deepen.evaluate import benchmarks, evaluate, headline
from deepen.manifest import Manifest, Terminated, terminate_as_exception
from deepen.merge import METHODS as MERGE_METHODS
from deepen.merge import merge
from deepen.models import require_model, resolve
from deepen.runs import RunResult
from deepen.train import model_folder, train
from deepen.verify import verify


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """--method and every plan argument, from the plan registry (deepen.plan.PLANS)."""
    parser.add_argument("--method", required=True, choices=plans.PLAN_METHODS,
                        help="; ".join(f"{name}: {b.help}" for name, b in plans.PLANS.items()))
    for arg in plans.PLAN_ARGS:
        parser.add_argument(f"--{arg.name}", type=arg.type, default=arg.default, choices=arg.choices, help=arg.help)


def plan_from_args(args: argparse.Namespace, n_layers: int) -> plans.Plan:
    return plans.build(args.method, n_layers, **{a.name: getattr(args, a.name) for a in plans.PLAN_ARGS})


def cmd_plan(args: argparse.Namespace) -> int:
    plan = plan_from_args(args, args.layers)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan)
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    plan = plan_from_args(args, read_hf_config(args.src)["num_hidden_layers"])
    print(plan)
    out = expand(args.src, args.out, plan, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                 allow_pickle=args.allow_pickle)
    print(f"wrote {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    manifest = Manifest.find(args.grown) if Path(args.grown).is_dir() else None
    plan = manifest.plan if manifest else None
    report = verify(resolve(args.base), args.grown, dtype=args.dtype)
    # a grown model is exact until it is trained; after training it is meant to differ
    must_be_exact = args.exact or (plan is not None and plan.function_preserving and manifest.trained is None)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    if plan is not None:
        print(f"plan: {plan.method}, {'function-preserving' if plan.function_preserving else 'changes the function'}")
    if must_be_exact and not report.exact:
        print("FAIL: a function-preserving plan must give exactly the base's function", file=sys.stderr)
        return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """deepen train, sft and dpo: one run of a config (sft, dpo: with that objective)."""
    objective = {"train": [], "sft": ["objective=sft"], "dpo": ["objective=dpo"]}[args.command]
    config = load_config(args.config, list(args.overrides) + objective + ([f"method={args.method}"] if args.method
                                                                         else []))
    if args.command == "dpo":
        out = run_dpo(config, args.stages, allow_change=args.allow_change, restart=args.restart)
    else:
        out = train(config, allow_change=args.allow_change, restart=args.restart)
    if not PartialState().is_main_process:
        return 0  # under torchrun / accelerate launch: one report
    run = RunResult.read(out.parent)
    if run.evaluated:
        print(run.line())
        scores = {k: run.last[k] for k in ("accuracy", "preference_accuracy", "reward_margin") if k in run.last}
        if scores:
            print("held-out " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in scores.items()))
    print(f"wrote {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = merge(args.a, args.b, args.out, args.method, args.t, max_shard_size=args.max_shard_size,
                overwrite=args.overwrite)
    print(f"wrote {out} ({args.method}, t={args.t:g}: {1 - args.t:g} of A, {args.t:g} of B)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_folder(args.model)
    require_model(path, "MODEL")
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
    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepen", description="Make a pretrained decoder LLM deeper without losing what it knows.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also DEEPEN_DEBUG=1)")
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
    p.add_argument("--method", choices=TRAIN_METHODS,
                   help="override the config's method: llama-pro (new blocks only), full, lora, blocks (those in blocks=[...])")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50 out=runs/x")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="when resuming, allow this config key to differ from the saved run's (repeatable): "
                        "train.lr (e.g. after a nan loss), train.clip, train.eval_every, train.save_every")
    p.add_argument("--restart", action="store_true", help="start the run over: remove what the out folder holds of an "
                                                          "earlier run (its checkpoints, logs and model) first")
    p.set_defaults(func=cmd_train)

    for name, help_ in (("sft", "instruction tuning after growth: loss on the response tokens only (e.g. "
                                "configs/tiny-sft.yaml; --method full tunes every block, as LLaMA Pro-Instruct)"),
                        ("dpo", "DPO on preference pairs; sDPO with --stages K (each stage's reference is the stage "
                                "before's result)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", required=True, help=f"run config (YAML), e.g. configs/tiny-{name}.yaml")
        p.add_argument("--method", choices=TRAIN_METHODS, help="override the config's method")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model=runs/x/model")
        p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                       help="when resuming, allow this config key to differ from the saved run's (as for train)")
        p.add_argument("--restart", action="store_true", help="start the run over (as for train)")
        if name == "dpo":
            p.add_argument("--stages", type=int, help="sDPO: split the pairs into this many chunks, one stage each "
                                                      "(default: the config's dpo.stages, 1: plain DPO)")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="merge two models of the same shape, tensor by tensor: average or SLERP")
    p.add_argument("a", help="model folder or hub id (t=0)")
    p.add_argument("b", help="model folder or hub id (t=1)")
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--method", default="average", choices=MERGE_METHODS, help="average (default) or slerp")
    p.add_argument("--t", type=float, default=0.5, help="how much of B, from 0 (A) to 1 (B) (default 0.5)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_merge)

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

    p = sub.add_parser("budget", help="parameters, FLOPs, memory per GPU and time for a run config, before any GPU")
    budget.add_arguments(p)
    p.set_defaults(func=budget.run)

    p = sub.add_parser("reproduce", help="the papers' comparisons on one rung (methods, placement, block count, "
                                         "DUS recovery): CSVs, figures and the claims beside the measurements")
    reproduce.add_arguments(p)
    p.set_defaults(func=reproduce.main)

    p = sub.add_parser("grade", help="grade submitted labs against the pristine ones (only the exercise cells are "
                                     "taken); write each exercise's result (JSON, CSV); exit 1 unless all pass")
    grade.add_arguments(p)
    p.set_defaults(func=grade.main)

    p = sub.add_parser("handout", help="write the labs as students receive them (no solutions) with their points")
    p.add_argument("out", help="a new folder for the labs and their README")
    p.set_defaults(func=grade.main_handout)

    p = sub.add_parser("demo", help="the main story on the built-in offline defaults")
    p.add_argument("--out", default="runs/demo", help="where the demo writes its models and results (default runs/demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a mistake of the user's (bad input, a missing file, a full disk, Ctrl-C, SIGTERM) ends
    with one line on stderr — what was wrong and what to do — and a non-zero exit, never a traceback, unless
    --debug or DEEPEN_DEBUG=1 asks for one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DEEPEN_DEBUG", "") not in ("", "0")
    try:
        with terminate_as_exception():
            return args.func(args)
    except BaseException as e:  # noqa: BLE001 — every error is turned into a message here, in one place
        message, code = user_error(e)
        if message is None or debug:
            raise
        print(f"deepen {args.command}: {message}", file=sys.stderr)
        return code


def user_error(e: BaseException) -> tuple[str | None, int]:
    """(the one line a user reads, the exit status) for an error a user can act on; (None, 0) for a bug."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C); nothing half-written was left behind", 130
    if isinstance(e, Terminated):
        return "terminated (SIGTERM); nothing half-written was left behind", 143
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {e.filename}" if e.filename else ""
        return f"error: no space left on the device{where}; nothing half-written was left behind. Free some space " \
               "or write to another disk", 1
    if isinstance(e, (ValueError, OSError, NotImplementedError, RuntimeError, FloatingPointError)):
        return f"error: {e}", 2
    return None, 0


if __name__ == "__main__":
    sys.exit(main())
