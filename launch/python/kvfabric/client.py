"""A client of kvfabric's control plane (``kvfabric-serve``): JSON lines over TCP or TLS.

Standard library only (socket, ssl, json), so a scheduler can drive a kvfabric job without the
native module. The protocol is include/kvfabric/server/control_protocol.h: one JSON request per
line, one reply line per request, in order; a line holding a JSON array is a batch.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

from .errors import Error, error_for

__all__ = [
    "Client",
    "Batch",
    "EventStream",
    "KvEventBatch",
    "Hello",
    "Placement",
    "PlanTable",
    "Step",
    "SequenceState",
    "ReplicaCost",
    "AdmissionCosts",
]

TlsArg = Union[None, bool, str, "os.PathLike[str]", ssl.SSLContext]


@dataclass(frozen=True)
class Hello:
    """What the server said on connecting: the protocol version, the job and who we are."""

    protocol: int
    model: str
    dp: int
    tp: int
    block_size: int
    block_bytes: int
    next_step: int
    tenant: str
    admin: bool


@dataclass(frozen=True)
class Placement:
    replica: int
    cached_tokens: int  #: prompt tokens in place after this step's plan; prefill the rest
    migrated_tokens: int
    blocks: list[int]
    #: non-zero: served an identical SnapKV request's kept prompt of this many tokens
    compressed_tokens: int = 0


@dataclass(frozen=True)
class PlanTable:
    """A sequence's block table in a step's reply: blocks from first_block on (the ones before
    are unchanged); the forward pass fills tokens [computed_tokens, num_tokens). A sequence
    compacted per layer group (pyramid) has one per group, ``layer_group`` naming it (None
    otherwise), read through that group's view of the pool."""

    seq: int
    replica: int
    num_tokens: int
    computed_tokens: int
    first_block: int
    blocks: list[int]
    layer_group: int | None = None


@dataclass(frozen=True)
class Compaction:
    """A sequence the step compacted (token compression): ``kept`` lists (first, count) ranges
    of its positions before the compaction, in order; the i-th kept token is now position i."""

    seq: int
    replica: int
    tokens_before: int
    kept: list[tuple[int, int]]
    layer_group: int | None = None


@dataclass(frozen=True)
class Step:
    step: int
    tables: list[PlanTable]
    released: list[int]
    preempted: list[int]
    ops: dict[str, int]  #: counts: swap_out, migrate, swap_in, copy
    #: sequences compacted in this step, and those whose attention scores the coordinator
    #: wants (report_attention) before its next compaction
    compactions: list[Compaction] = field(default_factory=list)
    score_requests: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SequenceState:
    replica: int
    swapped: bool
    blocks: list[int]


@dataclass(frozen=True)
class ReplicaCost:
    """How admit would weigh one replica for a prompt (the ``admission_costs`` reply)."""

    replica: int
    accepts: bool  #: takes a newcomer of this priority (not full, no swap-in of it waiting)
    cached_tokens: int
    migration_source: Optional[int]  #: where a longer cached prefix would move from
    migrated_tokens: int
    load: float
    cost: float  #: tokens to compute (and to move) at their costs, plus load
    blocks_needed: int
    blocks_available: int
    has_room: bool


@dataclass(frozen=True)
class AdmissionCosts:
    """Every replica's cost for a prompt, and where admit would go now (``chosen``: the
    cheapest replica that accepts it and has room; None when none has room)."""

    replicas: list[ReplicaCost]
    chosen: Optional[int]


def _admission_costs(reply: dict[str, Any]) -> AdmissionCosts:
    fields = ReplicaCost.__dataclass_fields__
    return AdmissionCosts([ReplicaCost(**{k: r[k] for k in fields}) for r in reply["replicas"]],
                          reply["chosen"])


@dataclass(frozen=True)
class KvEventBatch:
    """KV events of one step (or the subscription's snapshot, or a reset): blocks stored in or
    removed from a replica's prefix cache.

    Each event is a dict with "type" (BlockStored, BlockRemoved, AllBlocksCleared), "replica"
    and "tier"; BlockStored adds "block_hashes" (in prompt order), "parent_block_hash" (None at
    a prompt's start), "block_size", "num_tokens" and "salt" (None for public blocks);
    BlockRemoved adds "block_hashes".
    ``dropped`` counts the batches the server dropped for this subscriber so far (it keeps at
    most ``queue_limit`` waiting for a slow reader)."""

    step: int
    events: list[dict[str, Any]]
    dropped: int


def _token_ids(tokens: Sequence[int]) -> list[int]:
    """Token ids as JSON integers: a float is refused, not truncated (1.7 is no token id)."""
    ids = []
    for i, t in enumerate(tokens):
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise error_for("InvalidArgument", f"tokens[{i}] must be an integer token id "
                            f"(got {type(t).__name__})") from None
    return ids


def _scores(scores: Sequence[float]) -> list[float]:
    """Attention scores as JSON numbers; NaN and infinities have no JSON form."""
    values = []
    for i, s in enumerate(scores):
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise error_for("InvalidArgument", f"scores[{i}] must be a number "
                            f"(got {type(s).__name__})") from None
        if not math.isfinite(v):
            raise error_for("InvalidArgument", f"scores[{i}] = {v} is not finite")
        values.append(v)
    return values


def _json_default(value: Any) -> Any:
    """NumPy integers and floats (ids, counts, ratios) as the JSON numbers they are."""
    if hasattr(value, "__index__"):
        return operator.index(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _fields(**kwargs: Any) -> dict[str, Any]:
    """The request fields that were given: the server refuses unknown fields, and optional
    ones are left out rather than sent as null."""
    return {k: v for k, v in kwargs.items() if v is not None}


class Batch:
    """Requests to send as one line (``Client.batch``): each method adds one request and
    returns its index in the reply list."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def _add(self, op: str, **kwargs: Any) -> int:
        self.requests.append({"op": op, **_fields(**kwargs)})
        return len(self.requests) - 1

    def admit(self, seq: int, tokens: Sequence[int], priority: Optional[int] = None,
              cache_salt: Optional[str] = None, public_tokens: Optional[int] = None,
              compression: Optional[dict[str, Any]] = None) -> int:
        return self._add("admit", seq=seq, tokens=_token_ids(tokens), priority=priority,
                         cache_salt=cache_salt, public_tokens=public_tokens,
                         compression=compression)

    def report_attention(self, seq: int, step: int, scores: Sequence[float]) -> int:
        return self._add("report_attention", seq=seq, step=step, scores=_scores(scores))

    def admission_costs(self, tokens: Sequence[int], priority: Optional[int] = None,
                        cache_salt: Optional[str] = None,
                        public_tokens: Optional[int] = None) -> int:
        return self._add("admission_costs", tokens=_token_ids(tokens), priority=priority,
                         cache_salt=cache_salt, public_tokens=public_tokens)

    def append(self, seq: int, num_tokens: int) -> int:
        return self._add("append", seq=seq, num_tokens=num_tokens)

    def fork(self, src: int, dst: int, replica: Optional[int] = None) -> int:
        return self._add("fork", src=src, dst=dst, replica=replica)

    def free(self, seq: int) -> int:
        return self._add("free", seq=seq)

    def set_priority(self, seq: int, priority: int) -> int:
        return self._add("set_priority", seq=seq, priority=priority)

    def step(self) -> int:
        return self._add("step")

    def query(self, seq: int) -> int:
        return self._add("query", seq=seq)

    def stats(self) -> int:
        return self._add("stats")

    def reset_prefix_cache(self, replica: Optional[int] = None) -> int:
        return self._add("reset_prefix_cache", replica=replica)

    def __len__(self) -> int:
        return len(self.requests)


def _tls_context(tls: TlsArg) -> Optional[ssl.SSLContext]:
    if tls is None or tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is True:
        return ssl.create_default_context()  # the system's certificate authorities
    return ssl.create_default_context(cafile=os.fspath(tls))  # a CA (or self-signed) PEM file


class Client:
    """A blocking connection to a kvfabric control plane.

    >>> client = Client.connect("127.0.0.1", 7070, token=None, tls=None)

    ``tls``: None (plain TCP), True (verify against the system's CAs), a path to a CA file (a
    self-signed server certificate), or an ``ssl.SSLContext``. The server's certificate and
    name are verified. With ``token`` the connection authenticates as that tenant (``hello``);
    ``server`` holds the hello reply either way. A refused request raises ``kvfabric.Error``
    (the subclass of its code) with the server's code and message; it changed nothing.
    One request at a time: not thread-safe.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._subscribed = False
        self.server: Optional[Hello] = None

    @classmethod
    def connect(cls, host: str, port: int, token: Optional[str] = None, tls: TlsArg = None,
                timeout: Optional[float] = 30.0) -> "Client":
        """Connects, sends ``hello`` (with the token, if any) and returns the client."""
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            context = _tls_context(tls)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
            client = cls(sock)
            client.server = client.hello(token)
        except BaseException:
            sock.close()
            raise
        return client

    # --- plumbing --------------------------------------------------------------------------

    def _send_line(self, payload: Any) -> None:
        if self._subscribed:
            raise error_for("InvalidOperation", "this connection carries KV events only since "
                            "events() subscribed it; open another connection for requests")
        try:
            line = json.dumps(payload, separators=(",", ":"), default=_json_default,
                              allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:  # nothing was sent
            raise error_for("InvalidArgument", f"the request cannot be sent as JSON: {e}") from None
        self._sock.sendall(line.encode())

    def _read_reply(self) -> Any:
        line = self._reader.readline()
        if not line:
            raise error_for("Unavailable", "the server closed the connection")
        return json.loads(line)

    @staticmethod
    def _result(reply: Any) -> dict[str, Any]:
        if not isinstance(reply, dict):
            raise error_for("Internal", f"unexpected reply: {reply!r}")
        if not reply.get("ok", False):
            error = reply.get("error") or {}
            raise error_for(error.get("code", "Unknown"), error.get("message", str(reply)))
        return reply

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Sends one request (fields given as None are left out); returns the reply."""
        self._send_line({"op": op, **_fields(**fields)})
        return self._result(self._read_reply())

    def batch(self, requests: Union[Batch, Sequence[dict[str, Any]]]) -> list[Union[dict, Error]]:
        """Sends the requests as one line (a JSON array; they run in order, each on its own)
        and returns one entry per request, in order: its reply, or the Error it was refused
        with (returned, not raised: the others ran). A batch refused whole (too many
        requests) raises."""
        items = requests.requests if isinstance(requests, Batch) else list(requests)
        self._send_line(items)
        reply = self._read_reply()
        if not isinstance(reply, list):
            self._result(reply)  # raises the refusal
            raise error_for("Internal", f"a batch was answered with {reply!r}")
        out: list[Union[dict, Error]] = []
        for item in reply:
            try:
                out.append(self._result(item))
            except Error as error:
                out.append(error)
        return out

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the ops ---------------------------------------------------------------------------

    def hello(self, token: Optional[str] = None) -> Hello:
        r = self.request("hello", token=token)
        return Hello(r["protocol"], r["model"], r["dp"], r["tp"], r["block_size"],
                     r["block_bytes"], r["next_step"], r["tenant"], r["admin"])

    def admit(self, seq: int, tokens: Sequence[int], priority: Optional[int] = None,
              cache_salt: Optional[str] = None, public_tokens: Optional[int] = None,
              compression: Optional[dict[str, Any]] = None) -> Placement:
        """``compression``: token compression for the sequence, e.g. ``{"policy": "h2o",
        "budget_ratio": 0.25, "interval_steps": 16}`` (docs/control-protocol.md)."""
        r = self.request("admit", seq=seq, tokens=_token_ids(tokens), priority=priority,
                         cache_salt=cache_salt, public_tokens=public_tokens,
                         compression=compression)
        return Placement(r["replica"], r["cached_tokens"], r["migrated_tokens"], r["blocks"],
                         r.get("compressed_tokens", 0))

    def admission_costs(self, tokens: Sequence[int], priority: Optional[int] = None,
                        cache_salt: Optional[str] = None,
                        public_tokens: Optional[int] = None) -> AdmissionCosts:
        """How admit would weigh each replica for this prompt now, and where it would go;
        changes nothing (docs/control-protocol.md)."""
        return _admission_costs(self.request("admission_costs", tokens=_token_ids(tokens),
                                             priority=priority, cache_salt=cache_salt,
                                             public_tokens=public_tokens))

    def report_attention(self, seq: int, step: int, scores: Sequence[float]) -> None:
        """The attention scores of a compressed sequence, per token, summed over its
        replica's shards after running plan `step`, whose score request they answer: its next
        H2O or SnapKV compaction reads them."""
        self.request("report_attention", seq=seq, step=step, scores=_scores(scores))

    def append(self, seq: int, num_tokens: int) -> None:
        self.request("append", seq=seq, num_tokens=num_tokens)

    def fork(self, src: int, dst: int, replica: Optional[int] = None) -> int:
        """Creates ``dst`` sharing src's blocks (on ``replica``: migrated); returns its replica."""
        return self.request("fork", src=src, dst=dst, replica=replica)["replica"]

    def free(self, seq: int) -> None:
        self.request("free", seq=seq)

    def set_priority(self, seq: int, priority: int) -> None:
        self.request("set_priority", seq=seq, priority=priority)

    def step(self) -> Step:
        """Closes the step (an admin's); every rank has executed the plan when this returns."""
        r = self.request("step")
        tables = [PlanTable(t["seq"], t["replica"], t["num_tokens"], t["computed_tokens"],
                            t.get("first_block", 0), t["blocks"], t.get("layer_group"))
                  for t in r["tables"]]
        compactions = [Compaction(c["seq"], c["replica"], c["tokens_before"],
                                  [(k[0], k[1]) for k in c["kept"]], c.get("layer_group"))
                       for c in r.get("compactions", [])]
        return Step(r["step"], tables, r["released"], r["preempted"], r["ops"], compactions,
                    [q["seq"] for q in r.get("score_requests", [])])

    def query(self, seq: int) -> SequenceState:
        r = self.request("query", seq=seq)
        return SequenceState(r["replica"], r["swapped"], r["blocks"])

    def stats(self) -> dict[str, Any]:
        """An admin: the coordinator's counters, each replica and each tenant; a tenant: its
        own counters and quota."""
        r = self.request("stats")
        r.pop("ok", None)
        return r

    def reset_prefix_cache(self, replica: Optional[int] = None) -> int:
        """Drops every idle cached prefix, of one replica or all (an admin's); returns the
        blocks freed. Blocks running sequences use stay."""
        return self.request("reset_prefix_cache", replica=replica)["freed_blocks"]

    def shutdown(self) -> None:
        """Stops the server (an admin's, and only when it runs with --allow-shutdown)."""
        self.request("shutdown")

    def events(self, timeout: Optional[float] = None) -> "EventStream":
        """Subscribes this connection to the KV events (an admin's): from now on it carries
        only event lines, so send other requests on another connection. The first batch, when
        anything is cached, is a snapshot of every cached block (BlockStored events); each
        later one holds the changes of one step or reset. ``timeout`` bounds each wait for the
        next batch (None: wait for ever; a timeout raises TimeoutError)."""
        reply = self.request("subscribe")
        if reply.get("subscribed") is not True:
            raise error_for("Internal", f"subscribe was answered with {reply!r}")
        self._subscribed = True
        self._sock.settimeout(timeout)
        return EventStream(self, int(reply["queue_limit"]), int(reply.get("step", 0)))


class EventStream:
    """An iterator over KvEventBatch: the snapshot, then one per step or reset that changed a
    prefix cache. It ends when the server closes the connection; ``close()`` closes it from
    this side. A batch whose ``dropped`` grew follows a gap: subscribe again (a new connection)
    for a fresh snapshot."""

    def __init__(self, client: Client, queue_limit: int, step: int) -> None:
        self._client = client
        self.queue_limit = queue_limit  #: batches the server queues for us before dropping
        self.step = step  #: the step the snapshot was taken before

    def __iter__(self) -> Iterator[KvEventBatch]:
        return self

    def __next__(self) -> KvEventBatch:
        line = self._client._reader.readline()
        if not line:
            raise StopIteration
        message = json.loads(line)
        if "kv_events" not in message:
            Client._result(message)  # an error line (the server stopping) raises
            raise error_for("Internal", f"unexpected line on an event stream: {message!r}")
        batch = message["kv_events"]
        return KvEventBatch(batch["step"], batch["events"], message.get("dropped", 0))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
