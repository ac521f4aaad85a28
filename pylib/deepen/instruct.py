"""Data for the stages after growth: instruction examples (prompt -> response) and preference pairs (prompt ->
chosen, rejected), written in a chat template and tokenised with the response marked, so that instruction tuning
learns only the response tokens and DPO scores only them.

Built-ins, offline, generated from what the project already has:
- "math-sft":   the seeded math problems (deepen.data.math_problem) as question -> worked solution and answer;
- "code-sft":   functions of the Python standard library as docstring -> the function;
- "math-pairs": each math question with its worked solution (chosen) against the same solution ending in a
                plausible wrong answer (rejected: off by a small amount);
- "code-pairs": each docstring with its function (chosen) against the function with its last statement dropped.
Hub datasets by name, for online users: Open-Orca/SlimOrca, meta-math/MetaMathQA, sahil2801/CodeAlpaca-20k
(instructions), Intel/orca_dpo_pairs, HuggingFaceH4/ultrafeedback_binarized (pairs); any other hub dataset with
columns prompt/response (or prompt/chosen/rejected).

Held out: examples whose id's hash falls in the held-out share (deepen.data.is_heldout), as for documents; the
built-ins' ids are their corpus documents', so a held-out problem is unseen in pretraining and tuning alike. Hub
sets split by prompt. A training example whose prompt is also a held-out one is dropped.
"""

from __future__ import annotations

import ast
import random
import re
import textwrap
from dataclasses import dataclass

import torch

from deepen.batches import ResumedByStep, batches
from deepen.config import TEMPLATES
from deepen.data import HELDOUT_FRACTION, SPLITS, hub_offline_error, is_heldout, math_problem, stdlib_sources
from deepen.models import is_hub_id

# SOLAR's instruction tuning used an Alpaca-style template; "model" uses the tokenizer's own chat template.
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")
INSTRUCTIONS = ("math-sft", "code-sft")
PAIRS = ("math-pairs", "code-pairs")
EXAMPLES = 2_000  # examples per built-in set (math: problems 0..1999 of collection 0; code: the first functions)


@dataclass(frozen=True)
class Example:
    """One instruction example (response) or preference pair (chosen, rejected); `answer` the short final answer
    an exact-match check compares (math), else None."""

    prompt: str
    response: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    answer: str | None = None
    id: str | None = None  # what decides its split: the built-ins' document ids (as the corpora split them), else the prompt


# ---------------------------------------------------------------------------------------------- built-in sets


def _math(index: int) -> tuple[str, str, str]:
    """(question, worked solution with its answer, the answer) of math problem `index` of collection 0."""
    text = math_problem(0, index)
    problem, solution = text.split("\nSolution: ", 1)
    return problem.removeprefix("Problem: "), solution, solution.rsplit("Answer: ", 1)[1]


def _wrong(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: the number off by a small amount (x = 3 -> x = 5, 7/2 -> 9/2)."""
    numbers = list(re.finditer(r"-?\d+", answer))
    m = numbers[-1 if "/" not in answer else 0]
    wrong = int(m.group()) + rng.choice([-3, -2, -1, 1, 2, 3])
    return answer[:m.start()] + str(wrong) + answer[m.end():]


def _functions(limit: int) -> list[tuple[str, str, str]]:
    """(file, docstring, source) of small documented top-level functions of the standard library, in a stable
    order; file is the id the code corpus splits that file by."""
    found = []
    for file, source in stdlib_sources():
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and 3 <= node.end_lineno - node.lineno <= 25 and not node.name.startswith("_"):
                found.append((file, f"{node.name}: {doc.strip().splitlines()[0]}",
                              "\n".join(lines[node.lineno - 1:node.end_lineno])))
                if len(found) == limit:
                    return found
    return found


def _without_docstring(source: str) -> str:
    """The function's source with its docstring removed (the response must not repeat the prompt)."""
    tree = ast.parse(textwrap.dedent(source))
    fn = tree.body[0]
    body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(getattr(fn.body[0], "value", None),
                                                                          ast.Constant) else fn.body
    fn.body = body or [ast.Pass()]
    return ast.unparse(fn)


def _builtin(name: str) -> list[Example]:
    rng = random.Random(f"deepen-{name}")
    if name.startswith("math"):
        out = []
        for i in range(EXAMPLES):
            question, solution, answer = _math(i)
            doc = f"math/0/{i}"  # the id the math corpus splits this problem by: held out on both sides alike
            if name == "math-sft":
                out.append(Example(question, response=solution, answer=answer, id=doc))
            else:
                wrong = _wrong(answer, rng)
                out.append(Example(question, chosen=solution, rejected=solution[:solution.rindex("Answer: ")]
                                   + f"Answer: {wrong}", answer=answer, id=doc))
        return out
    out = []
    for file, doc, source in _functions(EXAMPLES):
        name_, _, summary = doc.partition(": ")
        prompt = f"Write a Python function `{name_}`: {summary}"
        code = _without_docstring(source)
        if name == "code-sft":
            out.append(Example(prompt, response=code, id=file))
        else:
            lines = code.splitlines()
            if len(lines) > 2:
                out.append(Example(prompt, chosen=code, rejected="\n".join(lines[:-1]), id=file))
    return out


# ---------------------------------------------------------------------------------------------- hub sets


def _from_hub(name: str, kind: str, limit: int) -> list[Example]:
    """The first `limit` examples of a hub dataset, mapped to prompt/response or prompt/chosen/rejected."""
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        raise hub_offline_error(name)
    repo, _, config = name.partition(":")
    split = "train_prefs" if repo == "HuggingFaceH4/ultrafeedback_binarized" else "train"
    out = []
    for row in datasets.load_dataset(repo, config or None, split=split, streaming=True):
        example = _map_row(repo, row, kind)
        if example is not None:
            out.append(example)
        if len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{name}: no {'pairs' if kind == 'pairs' else 'examples'} found; it needs columns "
                         "prompt and response (or prompt, chosen and rejected)")
    return out


def _last_assistant(messages) -> str | None:
    turns = [m.get("content") or m.get("value") for m in messages if m.get("role", m.get("from")) in
             ("assistant", "gpt")]
    return turns[-1] if turns else None


def _map_row(repo: str, row: dict, kind: str) -> Example | None:
    if repo == "Open-Orca/SlimOrca":
        human = [m["value"] for m in row["conversations"] if m["from"] == "human"]
        answer = _last_assistant(row["conversations"])
        return Example(human[0], response=answer) if human and answer else None
    if repo == "meta-math/MetaMathQA":
        return Example(row["query"], response=row["response"])
    if repo == "sahil2801/CodeAlpaca-20k":
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return Example(prompt, response=row["output"])
    if repo == "Intel/orca_dpo_pairs":
        return Example(row["question"], chosen=row["chosen"], rejected=row["rejected"])
    if repo == "HuggingFaceH4/ultrafeedback_binarized":
        return Example(row["prompt"], chosen=_last_assistant(row["chosen"]), rejected=_last_assistant(row["rejected"]))
    if kind == "pairs" and {"prompt", "chosen", "rejected"} <= set(row):
        return Example(row["prompt"], chosen=row["chosen"], rejected=row["rejected"])
    if kind == "instructions" and {"prompt", "response"} <= set(row):
        return Example(row["prompt"], response=row["response"])
    raise ValueError(f"{repo}: cannot read a row with columns {sorted(row)}; it needs prompt and response (or "
                     "prompt, chosen and rejected)")


def load_examples(name: str, kind: str, split: str = "train", limit: int = 20_000) -> list[Example]:
    """Examples of an instruction set (kind "instructions") or a preference set (kind "pairs"), one split."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {', '.join(SPLITS)}")
    builtins = INSTRUCTIONS if kind == "instructions" else PAIRS
    if name in INSTRUCTIONS + PAIRS and name not in builtins:
        raise ValueError(f"{name!r} is {'a preference set' if name in PAIRS else 'an instruction set'}; "
                         f"{'deepen sft' if kind == 'instructions' else 'deepen dpo'} takes one of "
                         f"{', '.join(builtins)} or a hub dataset")
    if name in builtins:
        examples = _builtin(name)
    elif is_hub_id(name.partition(":")[0]):  # "user/dataset" or "user/dataset:config"
        examples = _from_hub(name, kind, limit)
    else:
        raise FileNotFoundError(f"{name!r} is not a built-in set ({', '.join(builtins)}) nor a hub dataset name "
                                "like 'user/dataset'")
    held = [e for e in examples if is_heldout(e.id or e.prompt, HELDOUT_FRACTION)]
    if split == "heldout":
        kept = held
    else:
        unseen = {e.prompt for e in held}
        kept = [e for e in examples if not is_heldout(e.id or e.prompt, HELDOUT_FRACTION) and e.prompt not in unseen]
    if not kept:
        raise ValueError(f"{name!r} has no examples in its {split} split")
    return kept


# ---------------------------------------------------------------------------------------------- tokenising


def prompt_text(tokenizer, prompt: str, template: str) -> str:
    """The prompt as the model reads it, up to where the response begins."""
    if template == "alpaca":
        return ALPACA.format(prompt=prompt)
    if template == "model":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.template=model, but the tokenizer has no chat template; use data.template=alpaca")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"data.template={template!r} is not one of {', '.join(TEMPLATES)}")


def encode(tokenizer, prompt: str, response: str, template: str, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels): the templated prompt and the response followed by EOS, cut to `max_len` tokens; labels are
    the ids on the response and -100 (ignored by the loss) on the prompt."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; instruction tuning needs one to end each response")
    p = tokenizer(prompt_text(tokenizer, prompt, template), add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + r)[:max_len]
    labels = ([-100] * len(p) + r)[:max_len]
    return ids, labels


def pad_id(tokenizer) -> int:
    """The token that pads a batch: the tokenizer's pad token, else its EOS (the labels of padding are -100 anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded {"input_ids", "attention_mask", "labels"} (batch, longest) from (ids, labels) rows."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encoded(tokenizer, examples: list[Example], template: str, max_len: int, kind: str) -> list:
    """Each example tokenised: (ids, labels) for instructions; ((chosen ids, labels), (rejected ids, labels)) for
    pairs. Examples whose prompt leaves no room for the response within max_len are dropped."""
    out = []
    for e in examples:
        if kind == "instructions":
            rows = [encode(tokenizer, e.prompt, e.response, template, max_len)]
        else:
            rows = [encode(tokenizer, e.prompt, e.chosen, template, max_len),
                    encode(tokenizer, e.prompt, e.rejected, template, max_len)]
        if all(any(label != -100 for label in labels) for _, labels in rows):
            out.append(rows[0] if kind == "instructions" else tuple(rows))
    if not out:
        raise ValueError(f"no example fits data.seq_len={max_len} tokens with its response; raise data.seq_len")
    return out


class ExampleBatches(ResumedByStep):
    """Each process's share of the global batches of tokenised examples (instructions: one row each; pairs: a
    chosen and a rejected row each), every example once per epoch in a seeded order; resumable by step like
    deepen.batches.InMemoryBatches."""

    def __init__(self, rows: list, global_batch: int, steps: int, seed: int, pairs: bool):
        self.rows, self.global_batch, self.steps, self.seed, self.pairs = rows, global_batch, steps, seed, pairs

    def local_batches(self, start: int, rank: int = 0, world: int = 1):
        """(this process's rows, the global batch's tokens) for steps start+1, start+2, ..."""
        per = self.global_batch // world
        index = torch.arange(len(self.rows)).view(-1, 1)
        for step, picked in enumerate(batches(index, self.global_batch, self.steps, self.seed)):
            if step >= start:
                rows = [self.rows[i] for i in picked.flatten().tolist()]
                yield rows[rank * per:(rank + 1) * per], self.tokens(rows)

    def tokens(self, rows: list) -> int:
        """Tokens the rows hold: an example's ids; a pair's chosen and rejected ids."""
        return sum(len(r[0][0]) + len(r[1][0]) if self.pairs else len(r[0]) for r in rows)
