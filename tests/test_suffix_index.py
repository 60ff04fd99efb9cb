"""The suffix index (serving.engine.suffix): matches, counts, trees, domains, the budget and LRU."""

import random

import pytest

from serving.engine.suffix import Candidates, SuffixConfig, SuffixIndex, best


def test_a_repeated_passage_is_proposed_whole_with_full_confidence():
    index = SuffixIndex()
    index.add("code", [1, 2, 3, 4, 5, 6, 7])
    found = index.lookup("code", [9, 9, 2, 3], depth=3)
    assert found.tokens == (4, 5, 6) and found.parents == (-1, 0, 1)
    assert found.confidences == (1.0, 1.0, 1.0) and found.match == 2 and found.support == 1
    assert found.expected == 3.0


def test_the_longest_matching_suffix_decides():
    index = SuffixIndex()
    index.add("d", [7, 8, 1, 2, 30])  # matches the context's last 2 tokens only
    index.add("d", [5, 6, 1, 2, 40])  # matches its last 4
    found = index.lookup("d", [5, 6, 1, 2], depth=1)
    assert found.tokens == (40,) and found.match == 4 and found.support == 1


def test_confidences_are_the_shares_of_occurrences_and_the_chain_follows_the_likeliest():
    index = SuffixIndex()
    for tail in ([10, 11], [10, 12], [10, 12], [20, 21]):
        index.add("d", [1, 2, *tail])
    found = index.lookup("d", [1, 2], depth=2)
    nodes = {(found.parents[j], found.tokens[j]): found.confidences[j] for j in range(len(found.tokens))}
    ten = found.tokens.index(10)
    assert nodes == {
        (-1, 10): 0.75,
        (-1, 20): 0.25,
        (ten, 12): 0.5,
        (ten, 11): 0.25,
        (found.tokens.index(20), 21): 0.25,
    }
    assert all(parent < j for j, parent in enumerate(found.parents))  # parents before children
    chain = found.chain()
    assert (chain.tokens, chain.parents, chain.confidences) == ((10, 12), (-1, 0), (0.75, 0.5))
    assert chain.is_chain and not found.is_chain and (chain.match, chain.support) == (2, 4)


def test_the_tree_keeps_its_most_confident_nodes_within_its_bounds():
    index = SuffixIndex(SuffixConfig(min_confidence=0.3))
    for tail in ([10, 11, 13], [10, 11, 13], [10, 12], [20, 21], [22]):
        index.add("d", [1, 2, *tail])
    found = index.lookup("d", [1, 2], depth=3)
    assert found.tokens == (10, 11, 13) and found.parents == (-1, 0, 1)  # the others are 0.2 < 0.3
    assert index.lookup("d", [1, 2], depth=3, size=2).tokens == (10, 11)
    assert index.lookup("d", [1, 2], depth=1).tokens == (10,)


def test_domains_and_misses():
    index = SuffixIndex()
    index.add("prose", [1, 2, 3])
    assert index.lookup("code", [1, 2], depth=2) == Candidates()
    assert index.lookup("prose", [2, 9], depth=2) == Candidates()
    assert index.lookup("prose", [2], depth=2) == Candidates()  # shorter than min_match
    assert index.lookup("prose", [1, 2], depth=0) == Candidates()
    assert index.lookup("prose", [2, 3], depth=2) == Candidates()  # nothing follows it
    assert (index.lookups, index.hits) == (5, 0)
    assert index.lookup("prose", [1, 2], depth=2).tokens == (3,)
    assert index.hits == 1


def test_a_growing_document_matches_its_own_past_not_its_end():
    index = SuffixIndex()
    own = index.add("", [4, 5, 6, 4])
    assert index.lookup("", [4, 5, 6, 4], depth=2) == Candidates()  # "6 4" has not been seen before
    index.extend(own, [5])
    assert index.lookup("", [4, 5, 6, 4, 5], depth=2).tokens == (6, 4)


def test_max_match_caps_how_far_back_a_match_is_measured():
    index = SuffixIndex(SuffixConfig(max_match=3))
    index.add("d", [1, 2, 3, 4, 5, 50])
    index.add("d", [9, 2, 3, 4, 5, 60])
    found = index.lookup("d", [1, 2, 3, 4, 5], depth=1)
    assert found.match == 3 and sorted(found.tokens) == [50, 60]  # both match 3 back: a tie


def test_the_budget_evicts_the_least_recently_used_and_forgets_their_keys():
    index = SuffixIndex(SuffixConfig(budget_tokens=10))
    old = index.add("d", [1, 2, 3, 4])
    used = index.add("d", [5, 6, 7])
    assert index.lookup("d", [1, 2], depth=1).tokens == (3,)  # `old` is used now: `used` is the oldest
    index.add("d", [8, 9, 10, 11])
    assert index.tokens == 8 and len(index) == 2
    assert index.lookup("d", [5, 6], depth=1) == Candidates()
    index.remove(old)
    index.remove(old)  # a no-op
    assert index.lookup("d", [1, 2], depth=1) == Candidates() and index.tokens == 4
    index.extend(used, [1])  # evicted: left out
    assert index.tokens == 4


def test_a_document_longer_than_the_budget_keeps_its_last_tokens():
    index = SuffixIndex(SuffixConfig(budget_tokens=4))
    index.add("d", [1, 2, 3, 4, 5, 6])
    assert index.tokens == 4
    assert index.lookup("d", [3, 4], depth=2).tokens == (5, 6)
    assert index.lookup("d", [1, 2], depth=1) == Candidates()


def brute_force_longest(docs: list[list[int]], context: list[int], m: int, most: int) -> int:
    best_length = 0
    for tokens in docs:
        for end in range(m, len(tokens)):  # tokens[end] follows the match
            length = 0
            while length < min(most, len(context), end) and tokens[end - 1 - length] == context[-1 - length]:
                length += 1
            if length >= m:
                best_length = max(best_length, length)
    return best_length


def test_matches_agree_with_brute_force_and_the_budget_holds_throughout():
    rng = random.Random(0)
    config = SuffixConfig(budget_tokens=300, max_occurrences=10_000, min_confidence=0.01)
    index = SuffixIndex(config)
    held: dict[int, list[int]] = {}
    for _ in range(200):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 40))]
        held[index.add("d", tokens)] = tokens
        assert index.tokens <= config.budget_tokens
        live = [tokens for doc, tokens in held.items() if doc in index._docs]
        assert index.tokens == sum(len(t) for t in live)
        context = [rng.randrange(6) for _ in range(rng.randrange(2, 12))]
        found = index.lookup("d", context, depth=3)
        assert found.match == brute_force_longest(live, context, config.min_match, config.max_match)
        assert sum(c for c, p in zip(found.confidences, found.parents, strict=True) if p == -1) <= 1 + 1e-9
        for confidence, parent in zip(found.confidences, found.parents, strict=True):
            assert parent == -1 or found.confidences[parent] >= confidence
    for doc in list(held):
        index.remove(doc)
    assert index.tokens == 0 and not index._keys


def test_best_takes_the_candidates_that_promise_most():
    weak, strong = Candidates((1,), (-1,), (0.5,), 2, 2), Candidates((2, 3), (-1, 0), (1.0, 1.0), 5, 1)
    assert best(weak, strong) is strong and best(strong, weak) is strong and best(Candidates(), weak) is weak


@pytest.mark.parametrize(
    "bad", [{"budget_tokens": 0}, {"min_match": 3, "max_match": 2}, {"min_confidence": 0.0}]
)
def test_settings_are_checked(bad):
    with pytest.raises(ValueError):
        SuffixConfig(**bad)
