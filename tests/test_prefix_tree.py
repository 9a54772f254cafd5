"""`PrefixTree`: match and insert semantics, against a brute force; the LRU bound under churn."""

from __future__ import annotations

import random
import time

import pytest

from router.policies.prefix_tree import NODE_CHARS, Node, PrefixTree


def check_structure(tree: PrefixTree) -> None:
    """Private, but it is the point: counts, links and the backends invariant all hold."""
    chars = nodes = 0
    stack = [tree._root]
    while stack:
        node = stack.pop()
        for first, child in node.children.items():
            assert child.label and child.label[0] == first
            assert child.parent is node
            if node is not tree._root:
                assert set(child.backends) <= set(node.backends)
            chars += len(child.label)
            nodes += 1
            stack.append(child)
    assert (tree.chars, tree.nodes) == (chars, nodes)
    assert len(tree._heap) <= nodes


def test_match_reports_the_longest_prefix_per_backend() -> None:
    tree = PrefixTree()
    assert tree.match("anything") == (0, {})
    tree.insert("hello world", "a")
    assert tree.match("hello there") == (6, {"a": 6})
    assert tree.match("hello world, and more") == (11, {"a": 11})
    assert tree.match("xyz") == (0, {})
    tree.insert("hello wonder", "b")
    assert tree.match("hello world") == (11, {"a": 11, "b": 8})
    assert tree.match("hello wo") == (8, {"a": 8, "b": 8})
    tree.insert("hello", "c")  # a prefix of what is there: ends on a split
    assert tree.match("hello world") == (11, {"a": 11, "b": 8, "c": 5})
    tree.insert("hello world", "b")
    assert tree.match("hello world!") == (11, {"a": 11, "b": 11, "c": 5})
    assert tree.chars == len("hello world") + len("nder")
    check_structure(tree)


def test_matches_agree_with_a_brute_force() -> None:
    rng = random.Random(7)
    tree = PrefixTree(max_chars=10**9, max_prompt_chars=40)
    sent: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    def text() -> str:  # a small alphabet, so prompts share prefixes of every length
        return "".join(rng.choice("ab\x1ec") for _ in range(rng.randrange(0, 60)))

    for _ in range(600):
        backend_id, prompt = rng.choice("abc"), text()
        tree.insert(prompt, backend_id)
        sent[backend_id].append(prompt[:40])
    for _ in range(600):
        query = text()[:40]
        expected = {}
        for backend_id, prompts in sent.items():
            best = max(common_prefix(query, prompt) for prompt in prompts)
            if best:
                expected[backend_id] = best
        assert tree.match(query) == (max(expected.values(), default=0), expected)
    check_structure(tree)


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_only_the_head_of_a_long_prompt_is_stored() -> None:
    tree = PrefixTree(max_prompt_chars=1000)
    document = "lorem ipsum " * 10_000
    tree.insert(document + "question one", "a")
    assert tree.chars == 1000
    assert tree.match(document + "question two") == (1000, {"a": 1000})


def test_remove_backend_drops_what_only_it_held() -> None:
    tree = PrefixTree()
    tree.insert("shared system prompt, then alpha", "a")
    tree.insert("shared system prompt, then beta", "b")
    tree.insert("only a has this", "a")
    tree.remove_backend("a")
    assert tree.match("shared system prompt, then alpha") == (27, {"b": 27})
    assert tree.match("only a has this") == (0, {})
    assert tree.chars == len("shared system prompt, then beta")
    check_structure(tree)
    tree.remove_backend("b")
    assert (tree.chars, tree.nodes) == (0, 0)
    tree.insert("afterwards", "c")  # dropped nodes left no stale heap entries behind
    assert tree.match("afterwards") == (10, {"c": 10})
    check_structure(tree)


def test_eviction_keeps_the_tree_within_its_bound() -> None:
    bound = 50_000
    tree = PrefixTree(max_chars=bound, max_prompt_chars=2000)
    rng = random.Random(1)
    system = "You are a careful assistant. " * 20
    for n in range(5000):
        prompt = system + f"conversation {rng.random()} " + "x" * rng.randrange(0, 3000)
        tree.insert(prompt, f"backend-{n % 4}")
        assert tree.size <= bound and tree.chars <= bound
    check_structure(tree)
    assert tree.nodes > 10  # it held many prompts at a time, not one


def test_recently_used_prefixes_survive_eviction() -> None:
    tree = PrefixTree(max_chars=80_000)  # room for about 100 of the one-off prompts
    hot = "a conversation that keeps coming back " * 10
    cold = "a conversation seen once, long ago " * 10
    tree.insert(cold, "a")
    for n in range(2000):
        tree.insert(f"one-off prompt number {n} " * 5, "b")
        if n % 50 == 0:
            tree.insert(hot, "c")
    assert tree.match(hot)[1]["c"] == len(hot)
    # Only the head it shares with the hot prompt is left of the cold one: an inner node on
    # the hot path, which still remembers that backend `a` received it.
    assert tree.match(cold)[1]["a"] == len("a conversation ")
    check_structure(tree)


def test_matching_does_not_refresh_recency() -> None:
    tree = PrefixTree(max_chars=3 * NODE_CHARS + 30)
    tree.insert("first-prompt", "a")
    tree.insert("second-prompt", "a")
    tree.match("first-prompt")
    tree.insert("third-prompt", "a")  # over the bound: the oldest insert goes
    assert tree.match("first-prompt")[0] < len("first-prompt")
    assert tree.match("second-prompt")[0] == len("second-prompt")


def test_a_tiny_bound_still_holds() -> None:
    tree = PrefixTree(max_chars=10)
    for n in range(100):
        tree.insert(f"prompt {n}", "a")
        assert tree.size <= 10
    assert (tree.chars, tree.nodes) == (0, 0)
    with pytest.raises(ValueError):
        PrefixTree(max_chars=0)


def test_dropped_nodes_hold_no_references() -> None:
    tree = PrefixTree(max_chars=10**6)
    tree.insert("abc-one", "a")
    tree.insert("abc-two", "a")
    upper = tree._root.children["a"]
    tree.remove_backend("a")
    assert isinstance(upper, Node) and upper.parent is None and upper.children == {}


@pytest.mark.slow
def test_a_million_distinct_prompts_stay_within_a_small_bound() -> None:
    bound = 2_000_000
    tree = PrefixTree(max_chars=bound)
    system = "You are a helpful assistant that answers briefly. " * 8
    count, started, peak = 1_000_000, time.perf_counter(), 0
    for n in range(count):
        tree.insert(f"{system}user {n}: what is {n * 7919 % 100_003} squared?", f"b{n % 8}")
        if n % 1000 == 0:
            peak = max(peak, tree.size)
            assert tree.size <= bound
    elapsed = time.perf_counter() - started
    check_structure(tree)
    print(f"\n{count} distinct prompts: {elapsed / count * 1e6:.2f} us per insert; "
          f"{tree!r}; peak size {peak}, bound {bound}")
    assert tree.size <= bound
