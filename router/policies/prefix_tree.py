"""Which backends recently received which prompt prefixes: a bounded, approximate radix tree.

A compressed trie over characters: each node holds a run of characters (its label), the
children keyed by their first character, and the ids of the backends that received a prompt
running through it. Characters, not fixed-size chunks, because Python compares and slices
strings in C: walking a prompt costs one dict lookup and one `startswith` per node on its path
plus a C-speed comparison of its characters, and the match length is exact. Chunks would need a
hash per chunk (hundreds of Python-level calls for a long prompt) and lose up to a chunk of
precision at every branch.

It is approximate in three ways, all on purpose: it holds what the router sent, not what the
engine still caches; only the first `max_prompt_chars` characters of a prompt are stored (the
head is what decides a cache hit, and it caps the work per request); and least recently used
leaves are evicted to keep the tree within `max_chars`.

The bound counts label characters plus `NODE_CHARS` per node, because a node costs memory of
its own: prompts that branch every few characters would otherwise make a tree of few characters
and millions of nodes. Each node has one leaf-recency entry in a heap at most, refreshed lazily
when popped, so eviction costs O(log nodes) amortised per evicted node.
"""

from __future__ import annotations

import heapq
import itertools

__all__ = ["PrefixTree", "NODE_CHARS"]

NODE_CHARS = 400
"""What one node counts for against the bound: about its own memory in bytes (object, child
dict, backend tuple, string header, heap entry; measured with tracemalloc on CPython 3.11), as
an ASCII character costs one byte. So the bound is roughly the tree's memory in bytes."""


class Node:
    __slots__ = ("label", "parent", "children", "backends", "tick", "queued")

    def __init__(self, label: str, parent: Node | None, backends: tuple[str, ...], tick: int):
        self.label = label
        self.parent = parent
        """None once the node is dropped from the tree."""
        self.children: dict[str, Node] = {}
        self.backends = backends
        """Backends that received this node's whole path; an ancestor holds all of them too."""
        self.tick = tick
        """When a prompt last ran through this node (the tree's insert counter)."""
        self.queued = False
        """Has an entry in the eviction heap."""


class PrefixTree:
    """Prompt prefixes -> the backends that received them, within `max_chars`."""

    def __init__(self, max_chars: int = 10_000_000, max_prompt_chars: int = 4 * 4096) -> None:
        """`max_prompt_chars`: the head of a prompt that is stored and matched; the default is
        about 4096 tokens, far past any shared system prompt or document head."""
        if max_chars <= 0 or max_prompt_chars <= 0:
            raise ValueError("max_chars and max_prompt_chars must be positive")
        self.max_chars = max_chars
        self.max_prompt_chars = min(max_prompt_chars, max_chars)
        self.chars = 0
        """Label characters stored."""
        self.nodes = 0
        """Nodes, the root excluded."""
        self._root = Node("", None, (), 0)
        self._tick = 0
        self._heap: list[tuple[int, int, Node]] = []
        self._order = itertools.count()  # heap tie-breaker: nodes do not compare

    @property
    def size(self) -> int:
        """What the bound applies to: characters plus `NODE_CHARS` per node."""
        return self.chars + NODE_CHARS * self.nodes

    def match(self, text: str) -> tuple[int, dict[str, int]]:
        """The longest prefix of `text` in the tree, and per backend id the longest prefix
        that backend received. Reading does not refresh recency (`insert` does)."""
        text = text[: self.max_prompt_chars]
        node, at, end = self._root, 0, len(text)
        path: list[tuple[Node, int]] = []
        while at < end:
            child = node.children.get(text[at])
            if child is None:
                break
            label = child.label
            if text.startswith(label, at):
                at += len(label)
            else:
                at += common_length(label, text, at)
                path.append((child, at))
                break
            path.append((child, at))
            node = child
        lengths: dict[str, int] = {}
        for node, depth in reversed(path):
            # A node holds its descendants' backends: only a longer tuple adds any.
            if len(node.backends) > len(lengths):
                for backend_id in node.backends:
                    lengths.setdefault(backend_id, depth)
        return at, lengths

    def insert(self, text: str, backend_id: str) -> None:
        """Record that `backend_id` received `text` (its first `max_prompt_chars`)."""
        text = text[: self.max_prompt_chars]
        self._tick += 1
        tick = self._tick
        node, at, end = self._root, 0, len(text)
        while at < end:
            child = node.children.get(text[at])
            if child is None:
                self.chars += end - at
                if node.backends == (backend_id,) and not node.children:
                    # The next turn of a conversation: grow its leaf rather than hang a
                    # child under it, so paths stay short however many turns it has.
                    node.label += text[at:]
                    break
                leaf = Node(text[at:], node, (backend_id,), tick)
                node.children[text[at]] = leaf
                self.nodes += 1
                self._queue(leaf)
                break
            label = child.label
            length = len(label) if text.startswith(label, at) else common_length(label, text, at)
            if length < len(label):
                if at + length == end and backend_id in child.backends:
                    child.tick = tick  # a prompt seen before, e.g. an earlier turn resent
                    break
                child = self._split(node, child, length)
            if backend_id not in child.backends:
                child.backends += (backend_id,)
            child.tick = tick
            node, at = child, at + length
        self._evict()

    def remove_backend(self, backend_id: str) -> None:
        """Forget a backend that left the fleet; nodes only it held go. Costs the nodes that
        backend holds, not the whole tree (a node's backends include its descendants')."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            for child in list(node.children.values()):
                if backend_id not in child.backends:
                    continue
                if len(child.backends) == 1:
                    self._drop(child)
                else:
                    child.backends = tuple(b for b in child.backends if b != backend_id)
                    stack.append(child)
        # Dropped nodes may still have heap entries: clear them now, or they would stay until
        # the tree next reaches its bound, and pile up if backends come and go before that.
        self._heap = [entry for entry in self._heap if entry[2].parent is not None]
        heapq.heapify(self._heap)

    def _split(self, parent: Node, child: Node, length: int) -> Node:
        """Cut `child`'s label after `length` characters; return the new upper half."""
        upper = Node(child.label[:length], parent, child.backends, child.tick)
        child.label = child.label[length:]
        child.parent = upper
        upper.children[child.label[0]] = child
        parent.children[upper.label[0]] = upper
        self.nodes += 1
        return upper

    def _queue(self, node: Node) -> None:
        if not node.queued:
            node.queued = True
            heapq.heappush(self._heap, (node.tick, next(self._order), node))

    def _evict(self) -> None:
        """Drop least recently used leaves until within the bound. A heap entry may be older
        than its node's last use: it is then pushed back with the current tick. So the entry
        popped first with a current tick is the least recently used leaf."""
        heap = self._heap
        while self.chars + NODE_CHARS * self.nodes > self.max_chars and heap:
            tick, _, node = heapq.heappop(heap)
            node.queued = False
            if node.parent is None or node.children:
                continue  # dropped, or no longer a leaf: queued again when it is one
            if node.tick != tick:
                self._queue(node)
                continue
            self._drop(node)

    def _drop(self, node: Node) -> None:
        """Take `node` and its subtree out of the tree."""
        parent = node.parent
        assert parent is not None
        del parent.children[node.label[0]]
        stack = [node]
        while stack:
            gone = stack.pop()
            self.chars -= len(gone.label)
            self.nodes -= 1
            stack.extend(gone.children.values())
            gone.parent, gone.children = None, {}  # no cycles left for the GC to find
        if parent is not self._root and not parent.children:
            self._queue(parent)

    def __repr__(self) -> str:
        return (f"<PrefixTree chars={self.chars} nodes={self.nodes} size={self.size}"
                f"/{self.max_chars}>")


def common_length(label: str, text: str, start: int) -> int:
    """How many leading characters of `label` `text` repeats from `start`: a binary search
    over C-speed comparisons, never a Python loop over characters."""
    low, high = 0, min(len(label), len(text) - start)
    if text.startswith(label[:high], start):  # `text` ends inside `label`, e.g. a past turn
        return high
    while low < high:
        middle = (low + high + 1) // 2
        if text.startswith(label[low:middle], start + low):
            low = middle
        else:
            high = middle - 1
    return low
