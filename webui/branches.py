"""A conversation's messages as a tree, so that an edited question or a regenerated reply keeps what it replaced.

A node is a message dict ({"role", "content", ...}) that also holds "children" (the messages that may follow it,
each an alternative continuation) and "active" (which child is shown). The root is a node with no role. The
conversation shown, and sent to the model, is the path from the root along the active children; an alternative is
a sibling at some position of that path, shown as ‹ k/n › beside the message.
"""

from __future__ import annotations

from typing import Any

Node = dict[str, Any]
ROLES = ("user", "assistant")
MAX_DEPTH = 10_000  # a file this deep is not a conversation anyone had: refuse it rather than recurse forever


def new_root() -> Node:
    return {"children": [], "active": 0}


def node(message: dict[str, Any]) -> Node:
    """A message as a leaf of the tree (its own children, if any, are not kept)."""
    return {**{k: v for k, v in message.items() if k not in ("children", "active")}, "children": [], "active": 0}


def path(root: Node) -> list[Node]:
    """The messages shown: from the root along each node's active child."""
    shown = []
    at = root
    while at["children"]:
        at = at["children"][min(at["active"], len(at["children"]) - 1)]
        shown.append(at)
    return shown


def _parent(root: Node, index: int) -> Node:
    return root if index == 0 else path(root)[index - 1]


def append(root: Node, message: dict[str, Any]) -> Node:
    """Add `message` after the last one shown, and show it."""
    shown = path(root)
    parent = shown[-1] if shown else root
    leaf = node(message)
    parent["children"].append(leaf)
    parent["active"] = len(parent["children"]) - 1
    return leaf


def add_alternative(root: Node, index: int, message: dict[str, Any]) -> Node:
    """Add `message` as an alternative to the one shown at `index` (or after the last), and show it instead."""
    parent = _parent(root, min(index, len(path(root))))
    leaf = node(message)
    parent["children"].append(leaf)
    parent["active"] = len(parent["children"]) - 1
    return leaf


def positions(root: Node) -> list[tuple[int, int]]:
    """(k, n) for every message shown: it is alternative k (from 1) of n. One walk: the page asks at each
    streamed update."""
    found = []
    at = root
    while at["children"]:
        active = min(at["active"], len(at["children"]) - 1)
        found.append((active + 1, len(at["children"])))
        at = at["children"][active]
    return found


def switch(root: Node, index: int, step: int) -> bool:
    """Show the previous (step -1) or next (+1) alternative at `index`; whether anything changed."""
    if not 0 <= index < len(path(root)):
        return False
    parent = _parent(root, index)
    active = min(parent["active"], len(parent["children"]) - 1)
    wanted = max(0, min(len(parent["children"]) - 1, active + step))
    parent["active"] = wanted
    return wanted != active


def remove(root: Node, index: int) -> Node:
    """Delete the message shown at `index` with everything that follows it; an alternative, if any, is shown."""
    parent = _parent(root, index)
    active = min(parent["active"], len(parent["children"]) - 1)
    removed = parent["children"].pop(active)
    parent["active"] = max(0, min(active, len(parent["children"]) - 1))
    return removed


def detach(root: Node, target: Node) -> bool:
    """Delete `target` (and what follows it) wherever it is in the tree; whether it was there."""
    stack = [root]
    while stack:
        at = stack.pop()
        for i, child in enumerate(at["children"]):
            if child is target:
                active = min(at["active"], len(at["children"]) - 1)
                at["children"].pop(i)
                at["active"] = max(0, min(active - (i < active), len(at["children"]) - 1))
                return True
        stack += at["children"]
    return False


def linear(messages: list[dict[str, Any]]) -> Node:
    """A tree of one branch: conversations saved before there were alternatives, imported message lists."""
    root = at = new_root()
    for message in messages:
        leaf = node(message)
        at["children"].append(leaf)
        at = leaf
    return root


def flatten(root: Node, drop: frozenset[str] = frozenset(), skip: Any = None) -> tuple[list[dict[str, Any]], int]:
    """The tree as a list (what a file holds: JSON nests no deeper than a few hundred levels in Python, and a long
    conversation is thousands of messages deep): each node, parents first, with its parent's index ("parent", -1
    for the root) and its own "active" child; and the root's active child. Keys in `drop` and the nodes (with
    what follows them) for which `skip(node)` is true are left out."""
    nodes: list[dict[str, Any]] = []

    def kept(at: Node) -> tuple[list[Node], int]:
        children = [c for c in at["children"] if skip is None or not skip(c)]
        active = at["children"][min(at["active"], len(at["children"]) - 1)] if at["children"] else None
        position = next((i for i, c in enumerate(children) if c is active), len(children) - 1)
        return children, max(0, position)

    top, root_active = kept(root)
    stack = [(child, -1) for child in reversed(top)]
    while stack:
        at, parent = stack.pop()
        children, active = kept(at)
        index = len(nodes)
        nodes.append({**{k: v for k, v in at.items() if k not in drop and k not in ("children", "active")},
                      "parent": parent, "active": active})
        stack += [(child, index) for child in reversed(children)]
    return nodes, root_active


def unflatten(nodes: Any, root_active: Any = 0) -> Node:
    """The tree that `flatten` wrote; ValueError if `nodes` is not such a list."""
    if not isinstance(nodes, list):
        raise ValueError("'nodes' is not a list")
    root = new_root()
    built: list[Node] = []
    for i, item in enumerate(nodes):
        if not isinstance(item, dict):
            raise ValueError(f"message {i + 1} is not an object")
        parent = item.get("parent")
        if not isinstance(parent, int) or isinstance(parent, bool) or not -1 <= parent < i:
            raise ValueError(f"message {i + 1} has a bad 'parent' {parent!r}")
        leaf = {**{k: v for k, v in item.items() if k != "parent"}, "children": []}
        leaf.setdefault("active", 0)
        (root if parent < 0 else built[parent])["children"].append(leaf)
        built.append(leaf)
    root["active"] = root_active
    check_tree(root)
    return root


def check_tree(tree: Any) -> None:
    """Raise ValueError (saying where) unless `tree` is a root of well-formed message nodes."""
    stack = [(tree, 0, "the root")]
    while stack:
        at, depth, where = stack.pop()
        if not isinstance(at, dict):
            raise ValueError(f"{where} is not an object")
        if depth > MAX_DEPTH:
            raise ValueError(f"more than {MAX_DEPTH} messages in a row")
        if depth > 0:
            check_message(at, where)
        children, active = at.get("children"), at.get("active", 0)
        if not isinstance(children, list):
            raise ValueError(f"{where} has no list of children")
        if not isinstance(active, int) or isinstance(active, bool) or (children and not 0 <= active < len(children)):
            raise ValueError(f"{where} has a bad 'active' index {active!r}")
        stack += [(c, depth + 1, f"message {depth + 1} (alternative {i + 1})") for i, c in enumerate(children)]


def check_message(message: Any, where: str) -> None:
    """Raise ValueError unless `message` is {"role": "user" | "assistant", "content": str, ...} with well-typed
    optional fields."""
    if not isinstance(message, dict):
        raise ValueError(f"{where} is not an object")
    if message.get("role") not in ROLES:
        raise ValueError(f"{where} has role {message.get('role')!r}, not 'user' or 'assistant'")
    if not isinstance(message.get("content"), str):
        raise ValueError(f"{where} has no text content")
    if "stats" in message and not isinstance(message["stats"], dict):
        raise ValueError(f"{where} has statistics that are not an object")
    attachments = message.get("attachments", [])
    if not isinstance(attachments, list) or not all(
        isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("text"), str) for a in attachments
    ):
        raise ValueError(f"{where} has attachments that are not {{name, text}} objects")
