"""Client.events(): the KV-event stream of kvfabric-serve ({"op": "subscribe"}, an admin's).

Each line after the subscription is {"kv_events": {"step": S, "events": [...]}, "dropped": D}.
Block hashes are include/kvfabric/prefix/kv_events.h's chained hash: the first 8 bytes,
little-endian, of SHA-256 over the parent's hash (8 bytes little-endian, 0 for none) and each
token as 4 bytes little-endian (no salt bytes for the default tenant, whose blocks are public).
"""

from __future__ import annotations

import hashlib
import struct

import pytest

import kvfabric


def block_hash(parent: int | None, tokens: list[int]) -> int:
    data = struct.pack("<Q", parent or 0) + struct.pack(f"<{len(tokens)}I", *tokens)
    return struct.unpack("<Q", hashlib.sha256(data).digest()[:8])[0]


def test_events_stream_the_blocks_each_step_stores(server):
    with kvfabric.Client.connect(server.host, server.port) as listener, \
            kvfabric.Client.connect(server.host, server.port) as scheduler:
        stream = listener.events(timeout=10)
        assert stream.queue_limit > 0
        with pytest.raises(kvfabric.InvalidOperationError, match="KV events only"):
            listener.stats()  # the subscribed connection carries events only

        prompt = list(range(1000, 1040))  # 2 full blocks are cached, the 8-token tail is not
        scheduler.admit(1, prompt)
        assert scheduler.step().step == 0
        batch = next(stream)
        assert batch.step == 0 and batch.dropped == 0
        (stored,) = [e for e in batch.events if e["type"] == "BlockStored"]
        first = block_hash(None, prompt[:16])
        second = block_hash(first, prompt[16:32])
        assert stored["replica"] == 0 and stored["block_hashes"] == [first, second]
        assert stored["parent_block_hash"] is None and stored["salt"] is None
        assert (stored["block_size"], stored["num_tokens"]) == (16, 32)

        # A prompt that shares the first block stores one block under it.
        other = prompt[:16] + list(range(5000, 5016))
        scheduler.admit(2, other)
        assert scheduler.step().step == 1
        batch = next(stream)
        (stored,) = [e for e in batch.events if e["type"] == "BlockStored"]
        third = block_hash(first, other[16:])
        assert batch.step == 1 and stored["parent_block_hash"] == first
        assert stored["block_hashes"] == [third]

        # A new subscriber starts from a snapshot of everything cached.
        with kvfabric.Client.connect(server.host, server.port) as late:
            snapshot_stream = late.events(timeout=10)
            assert snapshot_stream.step == 2
            snapshot = next(snapshot_stream)
            assert {h for e in snapshot.events for h in e["block_hashes"]} == {first, second, third}
            assert all(e["type"] == "BlockStored" for e in snapshot.events)

        # Freed sequences leave their blocks cached; a reset drops them all.
        scheduler.free(1)
        scheduler.free(2)
        scheduler.step()
        assert scheduler.reset_prefix_cache() == 3
        batch = next(stream)
        assert batch.step == 3 and batch.dropped == 0
        assert batch.events == [{"type": "AllBlocksCleared", "replica": 0, "tier": "device"}]
        stream.close()
