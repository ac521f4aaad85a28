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


def _tiny_folder(path):
    import torch
    import transformers as T

    torch.manual_seed(0)  # small for testing efficiency
    config = T.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=97, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    T.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_expand_then_verify_exact(tmp_path, capsys):
    base = _tiny_folder(tmp_path / "base")
    assert main(["expand", str(base), str(tmp_path / "pro"), "--method", "llama-pro", "--groups", "2"]) == 0
    assert main(["verify", str(base), str(tmp_path / "pro")]) == 0
    assert "EXACT" in capsys.readouterr().out
    assert main(["verify", str(base), str(tmp_path / "pro"), "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\nplan:")[0])["exact"] is True


def test_verify_fails_when_a_function_preserving_plan_is_not_exact(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base = _tiny_folder(tmp_path / "base")
    assert main(["expand", str(base), str(tmp_path / "pro"), "--method", "llama-pro", "--groups", "2"]) == 0
    weights = tmp_path / "pro" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.2.mlp.down_proj.weight"][0, 0] = 1e-2  # down_proj left unzeroed, barely
    save_file(state, weights, metadata={"format": "pt"})
    assert main(["verify", str(base), str(tmp_path / "pro")]) == 1
    assert "FAIL" in capsys.readouterr().err


def test_dus_verify_reports_distance_and_passes(tmp_path, capsys):
    base = _tiny_folder(tmp_path / "base")
    assert main(["expand", str(base), str(tmp_path / "dus"), "--method", "dus", "--drop", "1"]) == 0
    assert main(["verify", str(base), str(tmp_path / "dus")]) == 0  # not function-preserving: a report, not a failure
    assert "changes the function" in capsys.readouterr().out


def test_expand_refuses_existing_out_and_missing_src(tmp_path, capsys):
    base = _tiny_folder(tmp_path / "base")
    (tmp_path / "exists").mkdir()
    assert main(["expand", str(base), str(tmp_path / "exists"), "--method", "llama-pro", "--groups", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["expand", str(tmp_path / "nope"), str(tmp_path / "o"), "--method", "dus", "--drop", "1"]) != 0
    assert not (tmp_path / "o").exists()
