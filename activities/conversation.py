"""An agent's conversation, kept in the snapshot store so workflow history only ever carries references.

Sending the whole conversation to every model activity makes history grow with the square of the number of
turns (and a long tool output can exceed Temporal's payload limit). Instead the conversation is a chain of small,
immutable, content-addressed nodes in the run's store::

    agent/nodes/<blake3>.json     {"parent": <ref or null>, "items": [...], "root": {...} on the first node only}
    agent/items/<blake3>.json     one tool result, written by the tool activity, folded into the next node
    agent/replies/<request ref>   which node answered the conversation <request ref> (see `Conversation.reply`)

Each model turn adds one node holding only what is new (tool results and the reply) plus its parent's ref, so a
turn costs the store a few kilobytes and history one 64-digit ref. Every object is checked against its hash
on read, and a worker keeps recently used nodes in an LRU cache: objects never change, so the cache is always
right, and a model call on a warm worker reads only the node written since its last call.

Items use the Responses API's input format (message, function_call, function_call_output); activities/model.py
converts them for Chat Completions.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import blake3
from pydantic import BaseModel, ConfigDict

from tardigrade.agent_spec import ModelConfig
from tardigrade.sandboxes.manifest import SecretEntry
from tardigrade.sandboxes.store_keys import AGENT_ITEMS, AGENT_NODES, AGENT_REPLIES
from tardigrade.sandboxes.stores import ObjectMissing, ObjectStore

CACHE_BYTES = 64 << 20


class ConversationError(Exception):
    """A conversation object is missing from the store or does not match its hash."""


class FunctionToolSpec(BaseModel):
    """A function tool as the step's agent was offered it: its schema for the model and how calls run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    parameters: dict[str, Any]
    timeout: float
    max_attempts: int


class AgentRoot(BaseModel):
    """Everything about an agent step that does not change from turn to turn, stored once in the root node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    index: int
    attempt: int
    label: str
    instructions: str
    model: ModelConfig
    tools: list[str]  # the step's tools, plus finish when done is "finish"
    function_tools: list[FunctionToolSpec] = []  # those of `tools` that are function tools, as registered
    done: str
    max_output_tokens: int | None
    env: dict[str, str]
    secrets: list[SecretEntry]  # names (or {name, hosts}) only; values are read on the worker
    cwd: str
    timeout: float


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    parent: str | None
    items: list[dict[str, Any]]
    root: AgentRoot | None = None


class StoredReply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    node: str
    input_tokens: int = 0
    output_tokens: int = 0


def _encode(value: Any) -> tuple[str, bytes]:
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return blake3.blake3(data).hexdigest(), data


class _LruCache:
    """Decoded immutable objects by store and key, bounded by the size of their encoded form. Thread-safe:
    activities read the store from worker threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: tuple[str, str], value: Any, size: int) -> None:
        with self._lock:
            if key in self._entries or size > self.max_bytes:
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted


class Conversation:
    """The conversations in one store. Synchronous (stores are): call it from a thread in async code."""

    def __init__(self, store: ObjectStore, cache: _LruCache) -> None:
        self.store = store
        self._cache = cache

    # -- content-addressed objects ----------------------------------------------------------------------------

    def _put(self, prefix: str, value: Any) -> str:
        ref, data = _encode(value)
        self.store.put(f"{prefix}{ref}.json", data)  # create-only: an existing object has this very content
        return ref

    def _get(self, prefix: str, ref: str) -> Any:
        key = f"{prefix}{ref}.json"
        cached = self._cache.get((self.store.url, key))
        if cached is not None:
            return cached
        try:
            data = self.store.get(key)
        except ObjectMissing:
            raise ConversationError(f"conversation object {key} is missing from store {self.store.url}") from None
        if blake3.blake3(data).hexdigest() != ref:
            raise ConversationError(f"conversation object {key} in store {self.store.url} does not match its hash")
        value = json.loads(data)
        self._cache.put((self.store.url, key), value, len(data))
        return value

    def put_node(self, node: Node) -> str:
        return self._put(AGENT_NODES, node.model_dump(mode="json"))

    def node(self, ref: str) -> Node:
        return Node.model_validate(self._get(AGENT_NODES, ref))

    def put_item(self, item: dict[str, Any]) -> str:
        return self._put(AGENT_ITEMS, item)

    def item(self, ref: str) -> dict[str, Any]:
        value = self._get(AGENT_ITEMS, ref)
        assert isinstance(value, dict)
        return dict(value)

    # -- conversations ----------------------------------------------------------------------------------------

    def chain(self, head: str) -> list[Node]:
        """The nodes from the root to ``head``."""
        nodes = []
        ref: str | None = head
        while ref is not None:
            node = self.node(ref)
            nodes.append(node)
            ref = node.parent
        nodes.reverse()
        if nodes[0].root is None:
            raise ConversationError(f"conversation {head} does not lead back to a root node")
        return nodes

    def root(self, ref: str) -> AgentRoot:
        root = self.node(ref).root
        if root is None:
            raise ConversationError(f"conversation node {ref} is not a root node")
        return root

    def call(self, root: str, node: str, call_id: str) -> tuple[AgentRoot, dict[str, Any]]:
        """The step's root and the tool call ``call_id`` the model made in ``node``."""
        agent = self.root(root)
        for item in self.node(node).items:
            if item.get("type") == "function_call" and item.get("call_id") == call_id:
                return agent, item
        raise ConversationError(f"conversation node {node} has no tool call {call_id!r}")

    def append(self, head: str, items: list[dict[str, Any]]) -> str:
        return head if not items else self.put_node(Node(parent=head, items=items))

    # -- replies ----------------------------------------------------------------------------------------------

    def reply(self, request: str) -> StoredReply | None:
        """The reply already given to the conversation ``request`` in this run, if any.

        The root names the run, the step and its attempt, so equal refs mean the very same request within one
        run: after a crash, a model call whose reply was received but not yet recorded in history, or an agent
        step restarted on the same files whose tools gave the same results, reuses the reply instead of asking
        (and paying for) the model again."""
        key = f"{AGENT_REPLIES}{request}.json"
        try:
            return StoredReply.model_validate_json(self.store.get(key))
        except ObjectMissing:
            return None

    def put_reply(self, request: str, reply: StoredReply) -> StoredReply:
        """Record the reply; if another attempt recorded one first, that one wins and is returned."""
        if self.store.put(f"{AGENT_REPLIES}{request}.json", reply.model_dump_json().encode()):
            return reply
        existing = self.reply(request)
        assert existing is not None
        return existing


class Conversations:
    """The worker's conversation stores, one per store URL, sharing one LRU cache."""

    def __init__(self, open_store: Callable[[str], ObjectStore], cache_bytes: int = CACHE_BYTES) -> None:
        self._open_store = open_store
        self._cache = _LruCache(cache_bytes)

    def open(self, store_url: str) -> Conversation:
        return Conversation(self._open_store(store_url), self._cache)
