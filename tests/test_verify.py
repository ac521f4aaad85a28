import torch
import transformers as T

from deepen.grow import grow
from deepen.plan import dus, llama_pro, stack
from deepen.verify import compare


def tiny(seed=0):  # small for testing efficiency
    torch.manual_seed(seed)
    config = T.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=97, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.LlamaForCausalLM(config).eval()


IDS = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(0))


def test_identity_report():
    base = tiny()
    report = compare(base, grow(base, llama_pro(4, 2)), IDS)
    assert report.exact and report.max_abs_logit_diff == 0.0 and report.same_generation
    assert report.kl == 0.0 and report.top1_agreement == 1.0 and report.ppl_base == report.ppl_grown
    assert "EXACT" in str(report) and report.to_dict()["exact"] is True


def test_moved_function_is_measured():
    base = tiny()
    report = compare(base, grow(base, stack(4, 2)), IDS)
    assert not report.exact and report.max_abs_logit_diff > 0 and report.kl > 0
    assert 0.0 <= report.top1_agreement < 1.0
    assert "differs" in str(report)


def test_a_single_wrong_weight_is_caught():
    base = tiny()
    grown = grow(base, llama_pro(4, 2))
    with torch.no_grad():
        grown.model.layers[2].mlp.down_proj.weight[0, 0] = 1e-3  # down_proj "left unzeroed", barely
    assert not compare(base, grown, IDS).exact


def test_dus_moves_the_trained_tiny_base_less_than_stacking():
    """SOLAR's claim, on a model where it holds (the tiny base, trained on English; measured on its held-out text):
    dropping m layers at the seam moves the function less than stacking the whole model twice."""
    from deepen.batches import HELDOUT_SETS
    from deepen.train import tiny_base

    base, tokenizer = tiny_base()
    blocks = HELDOUT_SETS["tiny"].blocks("general", tokenizer)[:8]
    n = base.config.num_hidden_layers
    a, b = compare(base, grow(base, dus(n, n // 4)), blocks), compare(base, grow(base, stack(n, 2)), blocks)
    assert 0 < a.kl < b.kl, (a.kl, b.kl)


def test_hidden_drift_is_zero_for_a_zeroed_expansion_and_grows_above_a_changed_block():
    from deepen.verify import hidden_drift

    torch.manual_seed(0)
    base = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()
    plan = llama_pro(4, groups=2)
    grown = grow(base, plan)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    originals = [i for i, layer in enumerate(plan.layers) if not layer.new]
    assert hidden_drift(base, grown, ids, originals) == [0.0] * 4  # the same stream after every original block
    with torch.no_grad():
        grown.model.layers[plan.new_layers[0]].mlp.down_proj.weight.normal_(0, 0.5)  # the first new block writes
    drift = hidden_drift(base, grown, ids, originals)
    assert drift[:2] == [0.0, 0.0] and drift[2] > 0 and drift[3] > 0  # frozen blocks above it read a changed input
