"""The seed-compatible classes: PagedKvCache, KvCache, PrefixKvCache (with CachedKvState and
HostKvCache), CacheManager and the tensor quantizers."""

from __future__ import annotations

import numpy as np
import pytest

import kvfabric
from test_bindings import attention_reference


def test_paged_kv_cache_keeps_the_seed_api_and_texts():
    cache = kvfabric.PagedKvCache(1024, 16, 32, 128).with_eviction_strategy(
        kvfabric.EvictionStrategy.lru())
    assert cache.block_memory_bytes == 2 * 16 * 32 * 128 * 2  # fp16 K and V of one layer
    cache.allocate(1, 48)
    cache.fork(1, 2)
    assert cache.used_block_count == 3 and cache.stats.total_forks == 1
    cache.append(2, 1)  # seq 2's 49th token needs a fourth block, no copy
    assert cache.get_sequence(2).block_ids[:3] == cache.get_sequence(1).block_ids
    cache.allocate(3, 40)
    cache.fork(3, 4)
    cache.append(4, 1)  # the shared tail is partly filled: copy-on-write
    (copy,) = cache.take_pending_copies()
    assert (copy.num_tokens, copy.reason) == (8, "copy_on_write")
    assert cache.get_sequence(99) is None
    assert str(kvfabric.EvictionStrategy.streaming_llm(4, 512)) == "StreamingLLM(sink=4, window=512)"
    assert "LRU" in str(cache)
    cache.verify_integrity()

    small = kvfabric.PagedKvCache(10, 16, 32, 128)
    with pytest.raises(kvfabric.OutOfMemoryError) as refused:
        small.allocate(1, 200)
    assert refused.value.message == "Out of memory: requested 13 blocks, 10 available"
    assert small.free_block_count == 10  # nothing changed
    with pytest.raises(kvfabric.NothingToEvictError, match="No sequences to evict"):
        small.evict()
    with pytest.raises(kvfabric.InvalidArgumentError):
        kvfabric.PagedKvCache(10, 0, 32, 128)  # block_size 0


def test_paged_kv_cache_compacts_and_evicts():
    cache = kvfabric.PagedKvCache(64, 16, 8, 64).with_eviction_strategy(
        kvfabric.EvictionStrategy.streaming_llm(4, 16))
    cache.allocate(1, 100)
    assert cache.apply_streaming_llm(1) == 80  # keeps 4 sink + 16 window tokens
    assert cache.get_sequence(1).num_tokens == 20
    cache.allocate(2, 50)
    assert cache.retain_tokens(2, [0, 5, 10, 49]) == 46
    assert cache.pending_copies and cache.stats.compactions == 2
    assert cache.evict_to_threshold(0.0) == [1, 2]
    assert cache.num_sequences == 0


def test_kv_cache_attention_matches_numpy():
    rng = np.random.default_rng(3)
    cache = kvfabric.KvCache(kvfabric.Backend.cpu(threads=1), num_layers=2, num_kv_heads=2,
                             head_dim=16, dtype="f32", block_size=16, capacity=64, pool_blocks=8)
    k = rng.standard_normal((20, 2, 16)).astype(np.float32)
    v = rng.standard_normal((20, 2, 16)).astype(np.float32)
    q = rng.standard_normal((20, 4, 16)).astype(np.float32)
    cache.ensure(7)
    for layer in range(2):
        cache.append(7, layer, k, v)
    out = cache.attention(7, 1, q)
    cache.advance(7)
    assert cache.len(7) == 20 and cache.block_table(7)[:2] != [0xFFFFFFFF] * 2
    np.testing.assert_allclose(out, attention_reference(q, k, v, 0), atol=1e-5)
    with pytest.raises(ValueError, match="key has dtype float64"):
        cache.append(7, 0, k.astype(np.float64), v)
    # Regression: a masked array's hidden values were written as data, and a NaN scale gave
    # all-NaN outputs.
    with pytest.raises(kvfabric.InvalidArgumentError, match="key is a masked array"):
        cache.append(7, 0, np.ma.masked_array(k, mask=k > 0), v)
    with pytest.raises(kvfabric.InvalidArgumentError, match="softmax_scale nan must be finite"):
        cache.attention(7, 1, q[:1], softmax_scale=float("nan"))
    assert cache.len(7) == 20
    cache.release(7)
    assert cache.free_blocks == 8
    with pytest.raises(TypeError, match="pool_blocks"):  # no default: 0 was always refused
        kvfabric.KvCache(num_layers=1, num_kv_heads=1, head_dim=16)


def test_prefix_kv_cache_stores_looks_up_and_restores():
    kv_dim, layers = 8, 2
    host = kvfabric.HostKvCache(layers, 16, kv_dim)
    for pos in range(6):
        for layer in range(layers):
            row = np.full(kv_dim, pos * 10 + layer, np.float32)
            host.store_kv(layer, row, -row)
        host.advance()
    cache = kvfabric.PrefixKvCache(min_prefix_len=4)
    tokens = [1, 2, 3, 4, 5, 6]
    assert cache.store(tokens, host, 6, kv_dim, layers) is True
    assert cache.store([1, 2], host, 2, kv_dim, layers) is False  # below min_prefix_len
    assert cache.lookup([1, 2, 3]) is None  # the seed's rule: a stored key must be a prefix
    with cache.lookup(tokens + [7, 8]) as hit:
        assert hit.matched_len == 6 and hit.pinned and cache.pinned == 1
        target = kvfabric.HostKvCache(layers, 16, kv_dim)
        kvfabric.PrefixKvCache.restore(hit, target)
        assert np.array_equal(target.get_keys(1), host.get_keys(1))
        assert hit.state.keys[0].shape == (6, kv_dim)
    assert cache.pinned == 0 and (cache.hits, cache.misses) == (1, 1) and len(cache) == 1
    with pytest.raises(kvfabric.InvalidArgumentError, match="3 positions for a key of 5 tokens"):
        cache.store([1, 2, 3, 4, 5], host, 3, kv_dim, layers)
    state = kvfabric.CachedKvState([np.zeros(16)], [np.zeros(16)], 2)
    assert (state.kv_dim, state.num_layers, state.memory_bytes) == (8, 1, 128)


def test_cache_manager_and_quantizers_reproduce_the_seed():
    q = kvfabric.quantize_asymmetric([0.0, 0.5, 1.0, -1.0, 0.25, -0.5, 0.75, -0.25], 2, 4)
    assert [q.code(i) for i in range(8)] == [7, 11, 15, 0, 9, 0, 15, 3]
    assert q.zero_points == pytest.approx([7.4999995, 6.0]) and len(q.data) == 4
    back = kvfabric.dequantize(q, 2)
    assert np.abs(back - [0.0, 0.5, 1.0, -1.0, 0.25, -0.5, 0.75, -0.25]).max() <= 1 / 15 + 1e-6

    manager = kvfabric.CacheManager(max_seq_len=4, num_heads=2, head_dim=4, quantization_bits=8,
                                    eviction_policy=kvfabric.H2oPolicy(recent_ratio=0.5))
    for i in range(4):
        manager.append(np.full(8, i, np.float32), np.full(8, -i, np.float32))
    manager.update_attention_scores([5.0, 0.0, 1.0, 0.0])
    manager.append(np.full(8, 4.0, np.float32), np.full(8, -4.0, np.float32))  # evicts one
    assert manager.token_positions() == [0, 2, 3, 4]  # the heavy hitter 0 and the 2 newest stay
    rows = manager.get([0, 3])
    assert rows.keys.shape == (2, 8) and rows.token_positions == [0, 4]
    np.testing.assert_allclose(rows.keys[1], 4.0, atol=1e-6)
    with pytest.raises(kvfabric.InvalidArgumentError):
        manager.get([9])
    # Finite values that no float32 holds, or whose range overflows one, are refused by name.
    with pytest.raises(kvfabric.InvalidArgumentError, match=r"key\[1\] = 1e\+300 does not fit"):
        manager.append(np.array([0.0, 1e300] + [0.0] * 6), np.zeros(8))
    with pytest.raises(kvfabric.InvalidArgumentError, match="a range wider than the largest float"):
        manager.append(np.array([-2e38, 2e38] + [0.0] * 6, np.float32), np.zeros(8))
    assert manager.token_positions() == [0, 2, 3, 4]
    with pytest.raises(kvfabric.InvalidArgumentError):
        kvfabric.CacheManager(max_seq_len=4, num_heads=2, head_dim=4, quantization_bits=9)
    pyramid = kvfabric.CacheManager(max_seq_len=64, num_heads=1, head_dim=4, quantization_bits=4,
                                    eviction_policy=kvfabric.PyramidKvPolicy(total_layers=4))
    budgets = [pyramid.layer_budget(layer) for layer in range(4)]
    assert sum(budgets) == 4 * 64 and budgets == sorted(budgets, reverse=True)
