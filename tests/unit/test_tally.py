"""ingress.core.tally: counts that drop their key at zero, and keys grouped with the largest
group (the learned cache's and the deferral records' quotas)."""

from __future__ import annotations

from ingress.core.tally import Groups, decrement


def test_decrement_drops_the_key_at_zero_and_never_goes_below() -> None:
    counts = {"a": 2, "b": 1}
    decrement(counts, "a")
    decrement(counts, "b")
    decrement(counts, "c")                        # not held: left alone
    assert counts == {"a": 1}
    decrement(counts, "a")
    assert counts == {}


def test_groups_count_keys_in_arrival_order() -> None:
    g = Groups()
    for key in ("k1", "k2", "k3"):
        g.add("g", key)
    assert g.count("g") == 3 and g.oldest("g") == "k1" and list(g.keys("g") or ()) == [
        "k1", "k2", "k3"]
    g.remove("g", "k1")
    g.remove("g", "nope")                         # ignored
    assert g.oldest("g") == "k2" and len(g) == 1
    g.remove("g", "k2")
    g.remove("g", "k3")
    assert len(g) == 0 and g.keys("g") is None and g.oldest("g") is None
    assert g.largest() == ("", 0)


def test_largest_is_the_least_recently_changed_of_equal_sizes() -> None:
    g = Groups()
    g.add("a", "1")
    g.add("b", "2")
    assert g.largest() == ("a", 1)
    g.touch("a")                                  # a changed last: b is older now
    assert g.largest() == ("b", 1)
    g.add("a", "3")
    assert g.largest() == ("a", 2)
    g.remove("a", "1")
    assert g.largest() == ("b", 1)                # a shrank to 1 and changed last
