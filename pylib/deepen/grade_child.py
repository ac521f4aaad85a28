"""The grading process of `deepen grade` (python -m deepen.grade_child FD): reads one job on stdin — the lab's setup
cells, then per exercise the student's code and the lab's own check call — and writes one verdict line per exercise
to the file descriptor FD, each tagged with the job's nonce (printed output never counts).

Everything the verdict depends on is taken before the student's code runs: the channel, the nonce, the check
functions, and a snapshot of the modules the checks compute with. After each check, an answer that changed any of
those modules (deepen's, torch's comparisons and tensors, math, builtins), or that called deepen's own implementation
of its exercise (deepen.checks.IMPLEMENTS), fails.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import json
import math
import os
import signal
import sys

import torch
import torch._dynamo  # noqa: F401 — imported first: on import it rewraps torch.manual_seed, which is not tampering
import torch.nn.functional
import torch.testing
import transformers.models.llama.modeling_llama  # the checks' models, loaded before the snapshot

from deepen import budget, checks, grow, llama, loop, merge, objectives, plan, trainable


class Timeout(BaseException):
    """An exercise ran past its time (raised by SIGALRM, so the student's code cannot catch it as an Exception)."""


VOLATILE = {("sys", n) for n in ("last_type", "last_value", "last_traceback", "last_exc", "stdout", "stderr")}


# torch's own functions the checks compare with (the rest of torch's namespace is rewrapped lazily by torch itself)
TORCH_COMPARISONS = ("equal", "allclose", "isclose", "isnan", "isfinite", "all", "any", "abs", "max", "where", "tensor",
                     "as_tensor", "stack", "cat", "zeros", "ones", "randn", "rand", "randint", "float32", "float64")


def _watched():
    hf = transformers.models.llama.modeling_llama  # the capstone's reference: its forward must stay its own
    modules = [checks, llama, plan, grow, trainable, loop, objectives, merge, budget, torch.nn.functional,
               torch.testing, math, builtins, sys, hf]
    classes = [torch.Tensor, torch.nn.Module, llama.RMSNorm, llama.Attention, llama.MLP, llama.Block, llama.Llama,
               plan.Plan, checks.Result, checks.LlamaForCausalLM, checks.LlamaConfig, hf.LlamaModel,
               hf.LlamaDecoderLayer, hf.LlamaAttention, hf.LlamaMLP, hf.LlamaRMSNorm, hf.LlamaRotaryEmbedding]
    return modules, classes


def _snapshot(modules, classes) -> dict:
    found = {("torch", name): id(getattr(torch, name)) for name in TORCH_COMPARISONS}
    for m in modules:
        for name, value in list(vars(m).items()):
            if (m.__name__, name) not in VOLATILE:
                found[(m.__name__, name)] = id(value)
    for c in classes:
        for name, value in list(vars(c).items()):
            found[(c.__qualname__, name)] = id(value)
    return found


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(f"{owner}.{name}" for (owner, name), ident in before.items() if after.get((owner, name)) != ident)


def _implementations(exercise: str) -> set:
    """The code objects of deepen's own implementation of `exercise`."""
    codes = set()
    for target in checks.IMPLEMENTS.get(exercise, ()):
        module, _, attr = target.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        obj = getattr(obj, "fget", obj)  # a property
        codes.add(obj.__code__)
    return codes


def _calls_into(codes: set, seen: list):
    """A profile hook recording a call of one of `codes` whose caller (torch's frames skipped: a module called
    through nn.Module) is the student's code."""
    def hook(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            caller = frame.f_back
            while caller is not None and f"{os.sep}torch{os.sep}" in caller.f_code.co_filename:
                caller = caller.f_back
            if caller is not None and caller.f_code.co_filename.startswith("<exercise"):
                seen.append(f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_qualname}")
    return hook


def _check_call(source: str, ns: dict, checks) -> tuple:
    """(the check function, args, kwargs) of the lab's check cell `checks.check_NAME(fn, key=value)`: the function
    taken from the checks module as it was imported, the arguments looked up in the student's namespace."""
    call = ast.parse(source).body[-1].value
    name = call.func.attr if isinstance(call.func, ast.Attribute) else call.func.id
    args = []
    for arg in call.args:
        if not isinstance(arg, ast.Name):
            raise ValueError(f"the check call {source!r} is not of the form checks.check_NAME(function)")
        if arg.id not in ns:
            raise LookupError(f"defines no `{arg.id}`: the lab checks {source.strip()}; keep the function's name")
        args.append(ns[arg.id])
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    return checks[name], args, kwargs


def grade(step: dict, ns: dict, check_functions: dict, snapshot, before: dict, timeout: int) -> dict:
    name = step["exercise"]

    def verdict(status: str, feedback: str) -> dict:
        return {"exercise": name, "status": status, "feedback": feedback}

    signal.alarm(max(1, timeout))
    try:
        try:
            exec(compile(step["source"], f"<exercise {name}>", "exec"), ns)
        except SyntaxError as e:
            return verdict("fail", f"the exercise cell does not parse: SyntaxError: {e.msg} (line {e.lineno})")
        except Timeout:
            return verdict("fail", f"the exercise cell ran past the --timeout of {timeout} s")
        except Exception as e:  # noqa: BLE001 — the student's cell raised: that exercise fails
            return verdict("fail", f"the exercise cell raised {type(e).__name__}: {e}")
        if step["check"] is None:
            return verdict("not run", "the lab has no check cell for this exercise")
        try:
            check, args, kwargs = _check_call(step["check"], ns, check_functions)
        except LookupError as e:
            return verdict("fail", str(e))
        seen: list[str] = []
        hook = _calls_into(_implementations(name), seen)
        sys.setprofile(hook)
        try:
            result = check(*args, **kwargs)
        except Timeout:
            return verdict("fail", f"the check of your function ran past the --timeout of {timeout} s")
        finally:
            profiled = sys.getprofile()
            sys.setprofile(None)
    finally:
        signal.alarm(0)
    changed = _changed(before, snapshot())
    if changed or profiled is not hook:
        what = ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "") if changed else "the profiler"
        return verdict("fail", f"tampered: the answer changed {what} while it ran; deepen grade does not accept it")
    if seen:
        owners = " and ".join(sorted({"deepen's" if name.startswith("deepen.") else f"{name.split('.')[0]}'"
                                      for name in seen}))
        return verdict("fail", f"calls {owners} own implementation ({', '.join(sorted(set(seen)))}): write the "
                               "exercise yourself")
    return verdict(result.status, result.feedback)


def main() -> None:
    channel = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    job = json.loads(sys.stdin.readline())
    nonce = job.pop("nonce")
    check_functions = {name: getattr(checks, name) for name in dir(checks) if name.startswith("check_")}
    modules, classes = _watched()
    before = _snapshot(modules, classes)

    def snapshot():
        return _snapshot(modules, classes)

    def alarm(signum, frame):
        raise Timeout

    signal.signal(signal.SIGALRM, alarm)
    ns = {"__name__": "__main__"}
    for source in job["setup"]:  # the lab's own cells before the first exercise (imports, the model it uses)
        exec(compile(source, "<lab setup>", "exec"), ns)
    for step in job["steps"]:
        channel.write(f"{nonce} {json.dumps(grade(step, ns, check_functions, snapshot, before, job['timeout']))}\n")
    channel.close()


if __name__ == "__main__":
    main()
