import json

import pytest

from deepen.cli import main


def test_plan_prints_the_map(capsys):
    assert main(["plan", "--layers", "32", "--method", "llama-pro", "--groups", "8"]) == 0
    out = capsys.readouterr().out
    assert "32 -> 40 layers, 8 new, function-preserving" in out and "[31]" in out


def test_plan_json(capsys):
    assert main(["plan", "--layers", "32", "--method", "dus", "--drop", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["n_layers"] == 48 and plan["function_preserving"] is False


@pytest.mark.parametrize("argv, message", [
    (["--method", "llama-pro", "--groups", "5"], "groups=5 does not divide 32 layers; try 1, 2, 4, 8, 16 or 32"),
    (["--method", "dus"], "method dus needs drop"),
    (["--method", "custom", "--map", "0-3,q"], "cannot read 'q'"),
])
def test_plan_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(["plan", "--layers", "32", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_method_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--layers", "32", "--method", "bogus"])
    assert "invalid choice" in capsys.readouterr().err
