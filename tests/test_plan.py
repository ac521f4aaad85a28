import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepen.plan import Layer, Plan, custom, dus, idus, llama_pro, stack


def test_llama_pro_paper_layout():
    # Llama-2-7B: 32 blocks, 8 groups of 4, one zeroed copy of each group's top block -> 40 blocks
    plan = llama_pro(32, groups=8)
    assert plan.n_layers == 40
    assert plan.new_layers == [4, 9, 14, 19, 24, 29, 34, 39]
    assert plan.zeroed_layers == plan.new_layers
    assert [plan.sources[i] for i in plan.new_layers] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert plan.function_preserving


def test_llama_pro_copies_and_placement():
    plan = llama_pro(8, groups=2, copies=2)
    assert plan.sources == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 6, 7]
    top, bottom = llama_pro(8, 2, placement="top"), llama_pro(8, 2, placement="bottom")
    assert top.sources == [0, 1, 2, 3, 4, 5, 6, 7, 3, 7] and top.new_layers == [8, 9]
    assert bottom.sources == [3, 7, 0, 1, 2, 3, 4, 5, 6, 7] and bottom.new_layers == [0, 1]
    assert top.function_preserving and bottom.function_preserving


def test_dus_is_solar():
    plan = dus(32, drop=8)  # SOLAR: [0, 24) + [8, 32) -> 48 layers
    assert plan.sources == list(range(24)) + list(range(8, 32))
    assert plan.n_layers == 48 and not plan.function_preserving
    assert plan.new_layers == list(range(24, 40))  # the second use of layers 8..23


def test_idus_and_stack():
    assert idus(32, 8, group=8).sources == [*range(0, 16), *range(8, 24), *range(16, 32)]
    assert idus(8, 2, group=1).sources == [0, 2, 1, 3, 2, 4, 3, 5, 4, 6, 5, 7]
    assert stack(3, 2).sources == [0, 1, 2, 0, 1, 2] and stack(3, 2).new_layers == [3, 4, 5]
    assert dus(8, 0).sources == stack(8, 2).sources


def test_custom_map_and_list():
    plan = custom("0-3,3z,4-7,7z")
    assert plan.sources == llama_pro(8, 2).sources and plan.zeroed_layers == [4, 9] and plan.function_preserving
    assert custom([0, 1, 1, 2]).new_layers == [2]
    assert custom([Layer(0), Layer(0, zero=True)], n_base=1).function_preserving


@pytest.mark.parametrize("call, message", [
    (lambda: llama_pro(32, 5), "try 1, 2, 4, 8, 16 or 32"),
    (lambda: llama_pro(32, 8, copies=5), "between 1 and the group size 4"),
    (lambda: llama_pro(32, 8, placement="middle"), "interleave, top, bottom"),
    (lambda: dus(32, 16), "must be in 0..15"),
    (lambda: idus(32, 8, group=5), "does not divide the 24 layers"),
    (lambda: stack(4, 0), "positive integer"),
    (lambda: custom("0-3,x"), "cannot read 'x'"),
    (lambda: custom([0, 5], n_base=4), "outside the base's layers 0..3"),
    (lambda: llama_pro(0, 1), "positive integer"),
])
def test_bad_arguments_name_the_fix(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        call()


def test_str_is_a_readable_map():
    text = str(llama_pro(8, 2))
    assert "8 -> 10 layers, 2 new, function-preserving" in text
    assert "0 1 2 3 [3] 4 5 6 7 [7]" in text
    assert "(8)" in str(dus(32, 8))


@given(n=st.integers(1, 48), data=st.data())
def test_llama_pro_properties(n, data):
    groups = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    copies = data.draw(st.integers(1, n // groups))
    placement = data.draw(st.sampled_from(["interleave", "top", "bottom"]))
    plan = llama_pro(n, groups, copies, placement)
    assert plan.n_layers == n + groups * copies
    assert plan.function_preserving
    assert len(plan.new_layers) == groups * copies and plan.new_layers == plan.zeroed_layers
    assert Plan.from_json(plan.to_json()) == plan


@given(n=st.integers(2, 48), data=st.data())
def test_dus_properties(n, data):
    drop = data.draw(st.integers(0, (n - 1) // 2))
    plan = dus(n, drop)
    assert plan.n_layers == 2 * (n - drop)
    assert sorted(set(plan.sources)) == list(range(n))  # every base layer is used
    assert plan.function_preserving == (n == 1)
    assert Plan.from_dict(plan.to_dict()) == plan
