import pytest

from edge_kit.variants import build_order, parse_variant


def test_pruned_variants_parse_to_kind_and_fraction():
    mag = parse_variant("int8-pruned-50")
    ch = parse_variant("int8-pruned-ch30")
    assert (mag.pruning, mag.sparsity, mag.precision) == ("magnitude", 0.5, "int8")
    assert (ch.pruning, ch.sparsity) == ("channel", 0.3)


@pytest.mark.parametrize("bad,hint", [("fp-16", "fp16"), ("int8-prune-50", "int8-pruned-50"), ("dynamic_int8", "dynamic-int8")])
def test_unknown_ids_suggest_the_closest(bad, hint):
    with pytest.raises(ValueError, match=f"did you mean '{hint}'"):
        parse_variant(bad)


def test_pruning_fraction_is_bounded():
    with pytest.raises(ValueError, match="1..95"):
        parse_variant("int8-pruned-0")


def test_a_pruning_level_has_one_id():
    for bad, good in (("int8-pruned-05", "int8-pruned-5"), ("int8-pruned-ch07", "int8-pruned-ch7")):
        with pytest.raises(ValueError, match=f"without a leading zero \\({good}\\)"):
            parse_variant(bad)


def test_build_order_dedupes_and_puts_bases_first():
    ids = [s.id for s in build_order(["edgetpu", "fp32", "int8", "fp32", "edgetpu"])]
    assert ids.count("int8") == 1 and ids.count("fp32") == 1
    assert ids.index("int8") < ids.index("edgetpu")


def test_edgetpu_alone_pulls_in_its_int8_base():
    assert [s.id for s in build_order(["edgetpu"])] == ["int8", "edgetpu"]
