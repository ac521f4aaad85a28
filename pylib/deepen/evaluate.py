"""Held-out perplexity: exp of the mean next-token loss over packed blocks, and the unigram baseline beside it;
per corpus for a model (`deepen eval MODEL --data general,code`): general = forgetting, domain = gain.
And the papers' benchmarks through lm-evaluation-harness (`deepen eval MODEL --tasks solar`), for users online."""

from __future__ import annotations

import functools
import math
import os

import torch

from deepen.batches import heldout_blocks, streams
from deepen.config import DataConfig
from deepen.extras import need
from deepen.instruct import encoded, load_examples, pad_id
from deepen.loop import perplexity  # the one definition, which training's held-out evaluation uses too
from deepen.objectives import answer_accuracy, response_losses
from deepen.train import model_folder


def unigram_perplexity(train_blocks: torch.Tensor, heldout_blocks: torch.Tensor, vocab_size: int) -> float:
    """The baseline a model must beat: token frequencies of the training blocks (add-one smoothed), no context,
    scored on the same held-out targets as `perplexity` (blocks[:, 1:])."""
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab_size).double() + 1
    log_p = counts.log() - counts.sum().log()
    return math.exp(-log_p[heldout_blocks[:, 1:].flatten()].mean().item())


def evaluate(model, tokenizer, corpora: list[str], seq_len: int = 256, n_blocks: int | None = 64,
             batch_size: int = 8) -> dict[str, dict]:
    """Held-out perplexity of `model` on each corpus: {corpus: {"perplexity", "tokens"}} — the first `n_blocks`
    blocks of each held-out split, as a run scores them (hub corpora streamed)."""
    results = {}
    for corpus in corpora:
        blocks = heldout_blocks(corpus, tokenizer, seq_len, n_blocks, streaming=streams(DataConfig(), corpus))
        results[corpus] = {"perplexity": perplexity(model, blocks, batch_size), "tokens": blocks[:, 1:].numel()}
    return results


# The papers' benchmarks as lm-evaluation-harness tasks -> few-shot examples, and the metric each paper reports.
# SOLAR reports the Open LLM Leaderboard (v1) six, "H6"; LLaMA Pro the same six plus code (pass@1).
# Their datasets come from the Hugging Face Hub, so these need a connection (or the hub cache) the first time.
LEADERBOARD_TASKS = {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0, "winogrande": 5, "gsm8k": 5}
PAPER_TASKS = {
    "solar": LEADERBOARD_TASKS,
    "llama-pro": {**LEADERBOARD_TASKS, "humaneval": 0, "mbpp": 3},
}
PAPER_METRICS = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm", "mmlu": "acc", "truthfulqa_mc2": "acc",
                 "winogrande": "acc", "gsm8k": "exact_match,strict-match", "humaneval": "pass@1,create_test",
                 "mbpp": "pass_at_1"}


def benchmarks(model, tasks, *, tokenizer=None, limit: int | float | None = None,
               num_fewshot: int | dict[str, int] | None = None, batch_size: int = 8, include_path=None,
               device: str | None = None, confirm_run_unsafe_code: bool = False,
               dtype: torch.dtype = torch.float32) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness tasks on a model: {task: {metric: value}}.

    model: a transformers causal LM (then `tokenizer` too, or it is loaded from `model.name_or_path`), or a model
    folder, hub id, "smollm2" or "tiny-base". tasks: harness task/group names, or a paper of PAPER_TASKS
    ("solar", "llama-pro") for its benchmarks at its few-shot counts. num_fewshot: one count for every task, or
    {task: count}; None keeps each task's (or the paper's) own. include_path: folder(s) of local task YAMLs.
    limit: examples per task (a fraction when < 1), for a quick look. device: where a model loaded from a name
    goes (default cuda when present; a model object stays where it is), in `dtype` (bfloat16 halves a 7B model's
    memory). confirm_run_unsafe_code: allow tasks that
    execute the model's code (HumanEval, MBPP). Metric names are the harness's, its ",none" filter dropped
    ("acc", "acc_norm", "acc_stderr", "exact_match,strict-match", ...).
    """
    simple_evaluate = need("lm_eval", "deepen eval --tasks").simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit >= 1:
        limit = int(limit)
    if confirm_run_unsafe_code:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # the `evaluate` library's code_eval asks for it too
    shots = _task_shots(tasks, num_fewshot)
    manager = _task_manager(list(shots), include_path)
    runs = {}  # few-shot count -> the harness's loaded tasks: one harness run each, datasets loaded before the model
    for name, n_shot in shots.items():
        runs.setdefault(n_shot, []).extend(_load_task(manager, name))
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        path = model_folder(str(model))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = tokenizer or path
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or model.name_or_path))
    was_training = model.training
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
    results = {}
    try:
        for n_shot, loaded in runs.items():
            out = simple_evaluate(lm, tasks=loaded, num_fewshot=n_shot, limit=limit, task_manager=manager,
                                  log_samples=False, confirm_run_unsafe_code=confirm_run_unsafe_code)
            for task, metrics in out["results"].items():
                results[task] = {key.removesuffix(",none"): value for key, value in metrics.items()
                                 if isinstance(value, float)}
    finally:
        model.train(was_training)
    return results


def headline(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: the metric its paper reports} for the tasks of `scores` that PAPER_METRICS names, and "average" (the
    papers' H6-style mean) when there are two or more."""
    picked = {task: scores[task][metric] for task, metric in PAPER_METRICS.items()
              if task in scores and metric in scores[task]}
    return {**picked, "average": sum(picked.values()) / len(picked)} if len(picked) > 1 else picked


def _task_shots(tasks, num_fewshot) -> dict[str, int | None]:
    """{task: few-shot count or None} from task names and/or paper names."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    shots = {}
    for name in (n.strip() for n in names if n.strip()):
        shots.update(PAPER_TASKS[name] if name in PAPER_TASKS else {name: None})
    if not shots:
        raise ValueError("no tasks given")
    for name in shots:
        if isinstance(num_fewshot, dict):
            shots[name] = num_fewshot.get(name, shots[name])
        elif num_fewshot is not None:
            shots[name] = num_fewshot
    return shots


def _task_manager(names: list[str], include_path):
    """A harness TaskManager that knows `names`: the local folders alone when they hold them all (a fraction of a
    second), else with the harness's own tasks (indexing its ~15k task files takes a while)."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        manager = _harness_tasks()
    else:
        paths = [str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else str(include_path)
        manager = TaskManager(include_path=paths, include_defaults=False)
        if not all(name in manager.all_tasks for name in names):
            manager = TaskManager(include_path=paths)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)} (papers: {', '.join(PAPER_TASKS)}; "
                         f"local task YAMLs: include_path)")
    return manager


@functools.cache
def _harness_tasks():
    """The harness's own tasks, indexed once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _load_task(manager, name: str) -> list:
    """[the harness's Group] for a group name, else its Task(s) (a tag names several), datasets loaded; a task
    whose dataset is on the hub and out of reach is a clear error naming it."""
    import datasets
    from huggingface_hub import constants

    try:
        loaded = manager.load([name])
    except OSError as e:
        if not (isinstance(e, ConnectionError) or constants.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE):
            raise
        raise ValueError(f"lm-eval task {name!r} needs its dataset from the Hugging Face Hub, which cannot be "
                         f"reached here ({e}); run it online once (the dataset is then cached), or give a local "
                         f"task with include_path") from e
    return [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())


def instruction_scores(model, tokenizer, name: str, seq_len: int = 256, n: int = 32, template: str = "alpaca",
                       batch_size: int = 8) -> dict[str, float]:
    """How well `model` does on the held-out part of an instruction set (deepen.instruct: "math-sft", "code-sft" or
    a hub set): the perplexity of the reference responses, and where the set has short answers (math) the
    exact-match accuracy of greedy answers — the numbers `deepen sft` logs, for any model."""
    examples = load_examples(name, "instructions", "heldout")[:n]
    device = next(model.parameters()).device
    rows = encoded(tokenizer, examples, template, seq_len, "instructions")
    scores = {"response_ppl": math.exp(response_losses(model, rows, pad_id(tokenizer), device, batch_size).mean().item())}
    answered = [e for e in examples if e.answer is not None]
    if answered:
        scores["accuracy"] = answer_accuracy(model, tokenizer, answered, template, device, batch_size=batch_size)
    return scores
