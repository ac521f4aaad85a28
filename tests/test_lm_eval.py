"""The lm-evaluation-harness adapter on a small local task (tests/data/lm_eval_tasks/deepen_easy: 20 easy English
and Python fill-ins, four choices each), offline: the harness's scores on the tiny base must equal the ones computed
by hand with deepen's own from-scratch Llama, and a real model (SmolLM2) must score far above chance."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from deepen.evaluate import PAPER_METRICS, PAPER_TASKS, benchmarks
from deepen.llama import Llama

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
QUESTIONS = [json.loads(line) for line in (TASKS / "deepen_easy" / "questions.jsonl").read_text().splitlines()]


@torch.no_grad()
def choices_by_hand(model, tokenizer) -> dict[str, list[int]]:
    """The choice each question's acc and acc_norm take: the largest log P(choice | question), summed over the
    choice's tokens by deepen.llama, and the same divided by the choice's length in characters."""
    llama = Llama.from_hf(model).eval()
    picks = {"acc": [], "acc_norm": []}
    for q in QUESTIONS:
        n_context = len(tokenizer(q["question"], add_special_tokens=False).input_ids)
        lls = []
        for choice in q["choices"]:
            ids = torch.tensor(tokenizer(q["question"] + choice, add_special_tokens=False).input_ids)
            log_p = llama(ids[None])[0, :-1].float().log_softmax(-1)  # (seq - 1, vocab): predicts ids[1:]
            lls.append(log_p[n_context - 1:].gather(-1, ids[n_context:, None]).sum().item())
        picks["acc"].append(max(range(4), key=lambda i: lls[i]))
        picks["acc_norm"].append(max(range(4), key=lambda i: lls[i] / len(q["choices"][i])))
    return picks


def task_with_answers(folder: Path, name: str, answers: list[int]) -> None:
    """A copy of deepen_easy named `name` whose right answers are `answers`."""
    shutil.copytree(TASKS / "deepen_easy", folder)
    (folder / "deepen_easy.yaml").rename(folder / f"{name}.yaml")
    yaml = folder / f"{name}.yaml"
    yaml.write_text(yaml.read_text().replace("task: deepen_easy", f"task: {name}"))
    (folder / "questions.jsonl").write_text("".join(json.dumps({**q, "answer": a}) + "\n"
                                                    for q, a in zip(QUESTIONS, answers)))


def test_the_local_task_is_well_formed():
    assert len(QUESTIONS) == 20
    assert all(len(q["choices"]) == 4 and 0 <= q["answer"] < 4 for q in QUESTIONS)
    assert sorted({q["answer"] for q in QUESTIONS}) == [0, 1, 2, 3]  # the right answer is not always first


def test_a_real_model_scores_far_above_chance(smollm2_model, smollm2_tokenizer):
    metrics = benchmarks(smollm2_model, ["deepen_easy"], tokenizer=smollm2_tokenizer, include_path=TASKS)["deepen_easy"]
    assert {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["acc"] >= 0.8  # chance is 0.25
    assert not smollm2_model.training


def test_harness_picks_the_same_choices_as_deepens_own(tmp_path):
    """Every question, not just the totals: tasks whose right answers are the choices deepen.llama picks must score
    exactly 1 in the harness."""
    from deepen.train import tiny_base

    model, tokenizer = tiny_base()
    picks = choices_by_hand(model, tokenizer)
    task_with_answers(tmp_path / "acc", "picks_acc", picks["acc"])
    task_with_answers(tmp_path / "acc_norm", "picks_acc_norm", picks["acc_norm"])
    results = benchmarks(model, "deepen_easy,picks_acc,picks_acc_norm", tokenizer=tokenizer,
                         include_path=[TASKS, tmp_path])
    assert results["picks_acc"]["acc"] == 1.0 and results["picks_acc_norm"]["acc_norm"] == 1.0
    right = [q["answer"] for q in QUESTIONS]
    for metric, picked in picks.items():
        assert results["deepen_easy"][metric] == pytest.approx(sum(map(int.__eq__, picked, right)) / len(right))


def test_a_hub_task_offline_is_a_clear_error(smollm2_model, smollm2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "hub_task.yaml").write_text((TASKS / "deepen_easy" / "deepen_easy.yaml").read_text().replace(
        "task: deepen_easy", "task: hub_task").replace("custom_dataset: !function utils.load",
                                                       "dataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy"))
    with pytest.raises(ValueError, match="'hub_task' needs its dataset from the Hugging Face Hub"):
        benchmarks(smollm2_model, ["deepen_easy", "hub_task"], tokenizer=smollm2_tokenizer,
                   include_path=[TASKS, tmp_path])


@pytest.mark.slow  # indexes the harness's ~15k task files (10-30 s)
def test_paper_tasks_are_harness_tasks_and_unknown_names_are_named(smollm2_model, smollm2_tokenizer):
    from deepen.evaluate import _harness_tasks

    assert set(PAPER_TASKS["solar"]) < set(PAPER_TASKS["llama-pro"]) == set(PAPER_METRICS)
    assert set(PAPER_METRICS) <= set(_harness_tasks().all_tasks)
    with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task"):
        benchmarks(smollm2_model, "arc_easy,no_such_task", tokenizer=smollm2_tokenizer)
    with pytest.raises(ValueError, match="'arc_easy' needs its dataset from the Hugging Face Hub"):
        benchmarks(smollm2_model, "arc_easy", tokenizer=smollm2_tokenizer)


def test_cli_prints_a_table_of_task_metrics(capsys):
    from deepen.cli import main

    assert main(["eval", "tiny-base", "--tasks", "deepen_easy", "--include-path", str(TASKS), "--limit", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr"]
    assert [line.split()[:2] for line in lines[1:]] == [["deepen_easy", "acc"], ["deepen_easy", "acc_norm"]]
    assert all(0 <= float(line.split()[2]) <= 1 for line in lines[1:])


def test_headline_picks_each_papers_metric_and_averages():
    from deepen.evaluate import headline

    scores = {"arc_challenge": {"acc": 0.5, "acc_norm": 0.6}, "mmlu": {"acc": 0.4}, "deepen_easy": {"acc": 1.0},
              "gsm8k": {"exact_match,flexible-extract": 0.3}}  # not the strict-match metric the papers report
    assert headline(scores) == {"arc_challenge": 0.6, "mmlu": 0.4, "average": pytest.approx(0.5)}
    assert headline({"mmlu": {"acc": 0.4}}) == {"mmlu": 0.4}  # one task: no average
