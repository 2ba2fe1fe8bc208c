"""The native bindings in one process: Config, Coordinator, StepPlan, RankCache (CPU backend)."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

import kvfabric
from kvfabric import _native  # noqa: F401  (fails here, loudly, when the module is not built)

from conftest import REPO


@pytest.fixture
def config(tiny_yaml) -> kvfabric.Config:
    return kvfabric.Config.parse(tiny_yaml)


# --- Config ----------------------------------------------------------------------------------


def test_config_loads_sets_and_validates(config):
    assert kvfabric.Config.load(str(REPO / "configs" / "tiny-cpu.yaml")).model.name == "tiny-cpu"
    assert (config.model.num_layers, config.model.head_dim, config.cache.kv_dtype) == (2, 16, "f32")
    config.cache.block_size = 32  # sections are set in place
    config.cache.eviction.strategy = "priority"
    assert config.cache.block_size == 32 and config.cache.eviction.strategy == "priority"
    config.validate()
    assert "block_size: 32" in config.dump()
    # 2 layers x 2 KV heads x 32 tokens x 16 dims x K,V x 4 bytes
    assert config.block_bytes == 2 * 2 * 32 * 16 * 2 * 4

    config.model.num_kv_heads = 3  # 4 query heads are not a multiple of 3
    with pytest.raises(kvfabric.InvalidArgumentError) as refused:
        config.validate()
    assert refused.value.code == "InvalidArgument" and "num_kv_heads" in refused.value.message


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(kvfabric.Error) as refused:
        kvfabric.Config.parse("model: {num_layers: 2, num_query_heads: 4, num_kv_heads: 2, "
                              "head_dim: 16}\ncache: {block_sise: 16, num_blocks: 8}\n", "bad.yaml")
    assert refused.value.code == "ParseError" or refused.value.code == "InvalidArgument"
    assert "block_sise" in refused.value.message
    with pytest.raises(kvfabric.Error) as missing:
        kvfabric.Config.load(str(tmp_path / "none.yaml"))
    assert missing.value.code in ("IoError", "NotFound")
    with pytest.raises(kvfabric.InvalidArgumentError):
        kvfabric.Config().cache.kv_dtype = "float7"
    with pytest.raises(kvfabric.InvalidArgumentError, match="no field 'layers'"):
        kvfabric.ModelConfig(layers=2)


def test_every_config_key_is_an_attribute():
    # Regression: server.max_connections_per_tenant and server.event_queue_batches had no
    # attribute, so Python could read and set them only through YAML text.
    config = kvfabric.Config()
    renamed = {"cache.memory_budget": "memory_budget_bytes"}  # an int, where YAML takes "16GiB"
    for key in kvfabric.Config.keys():
        *sections, name = key.split(".")
        if sections == ["runtime"] and name in ("backend", "transport", "device"):
            continue  # kvfabric-serve's ranks: Python passes its backend and transport objects
        name = renamed.get(key, name)
        owner = config
        for section in sections:
            owner = getattr(owner, section)
        assert hasattr(owner, name), key


def test_a_config_field_set_to_what_it_cannot_hold_is_named(config):
    for value, says in ((-1, "CacheConfig.block_size = -1 is outside [0, 4294967295]"),
                        (2**32, "= 4294967296 is outside"),
                        ("16", "CacheConfig.block_size must be an integer (got str)"),
                        (True, "must be an integer (got bool)"),
                        (1.5, "must be an integer (got float)")):
        with pytest.raises(kvfabric.InvalidArgumentError, match=re.escape(says)):
            config.cache.block_size = value
    assert config.cache.block_size == 16  # unchanged
    with pytest.raises(kvfabric.InvalidArgumentError, match="ModelConfig.head_dim = -1"):
        kvfabric.ModelConfig(head_dim=-1)
    with pytest.raises(kvfabric.InvalidArgumentError, match="prefill_token_cost must be a number"):
        config.coordinator.prefill_token_cost = "x"
    config.coordinator.prefill_token_cost = 2  # an int is a number, and so are NumPy's
    assert config.coordinator.prefill_token_cost == 2.0
    config.coordinator.migration_token_cost = np.float32(0.5)
    config.cache.block_size = np.int64(32)
    assert (config.coordinator.migration_token_cost, config.cache.block_size) == (0.5, 32)


def test_configs_compare_by_value(config):
    same = kvfabric.Config.parse(config.dump())
    assert same == config and same is not config and config != "a config"
    same.cache.block_size = config.cache.block_size * 2
    assert same != config


def test_env_overrides_apply_or_change_nothing(config):
    config.apply_env_overrides({"KVF_CACHE_BLOCK_SIZE": "32"})
    assert config.cache.block_size == 32
    with pytest.raises(kvfabric.Error) as refused:
        config.apply_env_overrides({"KVF_CACHE_BLOKC_SIZE": "64"})
    assert "KVF_CACHE_BLOCK_SIZE" in refused.value.message  # the closest key
    assert config.cache.block_size == 32
    # Regression: values or keys that are not strings raised pybind's opaque RuntimeError.
    for env, says in (({"KVF_CACHE_BLOCK_SIZE": 64}, "got str -> int"), ({5: "64"}, "got int"),
                      (["KVF_CACHE_BLOCK_SIZE"], "dict of strings (got list)")):
        with pytest.raises(kvfabric.InvalidArgumentError, match=re.escape(says)):
            config.apply_env_overrides(env)
    assert config.cache.block_size == 32


def test_arguments_of_the_wrong_type_are_named(config):
    # Regression: these raised pybind's RuntimeError "Unable to cast Python instance".
    c = kvfabric.Coordinator(config)
    for compression, says in (({"policy": 5}, "compression['policy'] must be a string (got int)"),
                              ({"policy": "h2o", "budget_tokens": "x"},
                               "compression['budget_tokens'] must be a number (got str)"),
                              ({"policy": "h2o", "budget_tokens": True}, "(got bool)"),
                              ({"policy": "h2o", 3: 1}, "got a int key")):
        with pytest.raises(kvfabric.InvalidArgumentError, match=re.escape(says)):
            c.admit(1, list(range(20)), compression=compression)
    assert c.admit(1, list(range(20)), compression={"policy": "h2o",
                                                     "budget_tokens": np.int64(8)}).replica == 0
    c.append(np.int64(1), 1)  # a NumPy integer is an id, as everywhere else
    assert c.tokens_of(1) == 21
    with pytest.raises(kvfabric.InvalidArgumentError, match=re.escape("seqs = -1 is outside")):
        c.append(-1, 1)
    with pytest.raises(kvfabric.InvalidArgumentError, match="1-dimensional"):
        c.append(np.array(1), 1)
    assert c.tokens_of(1) == 21
    # A masked array's hidden values are no ids, and a plan is no number; bytes in any buffer
    # are parsed as a plan (as StepPlan.deserialize takes them).
    with pytest.raises(kvfabric.InvalidArgumentError, match="seqs is a masked array"):
        c.append(np.ma.masked_array([1], mask=[True]), 1)
    with pytest.raises(kvfabric.InvalidArgumentError, match="plan must be a StepPlan"):
        kvfabric.RankCache(config).receive_and_execute(3)
    with pytest.raises(kvfabric.ParseError, match="step plan truncated"):
        kvfabric.RankCache(config).receive_and_execute(bytearray(b"x"))


# --- Coordinator and StepPlan ----------------------------------------------------------------


def test_coordinator_workflow_and_plan_contents(config):
    c = kvfabric.Coordinator(config)
    prompt = list(range(1000, 1040))  # 40 tokens: 2 full blocks and 8 tokens
    placed = c.admit(1, prompt)
    assert (placed.replica, placed.cached_tokens, len(placed.blocks)) == (0, 0, 3)
    assert placed.compressed_tokens == 0  # not served an identical SnapKV request's kept prompt

    plan = c.step()
    assert plan.step == 0 and plan.ops == [] and plan.released == []
    (table,) = plan.tables
    assert (table.seq, table.replica, table.num_tokens, table.computed_tokens) == (1, 0, 40, 0)
    assert (table.first_block, table.blocks) == (0, placed.blocks)

    # A second prompt with the same first 32 tokens finds them cached (indexed by step 0).
    again = c.admit(2, prompt[:32] + [7, 8, 9])
    assert again.cached_tokens == 32 and again.blocks[:2] == placed.blocks[:2]
    c.fork(1, 3)
    c.append([1, 3], 1)  # they share a partly filled block: the first to write copies it
    c.set_priority(2, 1)
    plan = c.step()
    assert plan.step == 1
    assert [op.kind for op in plan.ops] == ["copy"]
    copy = plan.ops[0].copy
    assert (copy.src_block, copy.src_offset, copy.num_tokens, copy.reason) == (
        placed.blocks[2], 0, 8, "copy_on_write")
    assert c.query(1).blocks == placed.blocks[:2] + [copy.dst_block]
    assert c.query(3).blocks == placed.blocks  # the fork keeps the original, now its own
    tables = {t.seq: t for t in plan.tables}
    assert tables[2].computed_tokens == 32 and tables[2].num_tokens == 35
    assert (tables[1].num_tokens, tables[1].computed_tokens) == (41, 40)
    # Seq 1's table carries only what changed: its last block, from index 2 on.
    assert tables[1].first_block == 2 and tables[1].blocks == [copy.dst_block]
    assert kvfabric.apply_table_change(placed.blocks, tables[1]) == c.query(1).blocks
    assert (tables[3].first_block, tables[3].blocks) == (0, placed.blocks)  # new: whole

    c.free(2)
    plan = c.step()
    assert plan.released == [2]
    assert c.stats().admitted == 2 and c.stats().steps == 3
    assert c.replica_stats(0).sequences == 2
    c.verify_integrity()
    assert "StepPlan(step=2" in repr(plan) and "released=[2]" in repr(plan)


def test_step_plan_serializes_and_refuses_garbage(config):
    c = kvfabric.Coordinator(config)
    c.admit(1, list(range(40)))
    plan = c.step()
    data = plan.serialize()
    assert isinstance(data, bytes)
    assert kvfabric.StepPlan.deserialize(data) == plan
    assert kvfabric.StepPlan.deserialize(bytearray(data)) == plan
    with pytest.raises(kvfabric.ParseError) as refused:
        kvfabric.StepPlan.deserialize(data[: len(data) // 2])
    assert refused.value.code == "ParseError" and refused.value.message
    # A strided view is not the bytes at its start: it was read as if it were (past its end
    # when reversed).
    doubled = np.repeat(np.frombuffer(data, dtype=np.uint8), 2)
    for view in (doubled[::2], np.frombuffer(data, dtype=np.uint8)[::-1]):
        with pytest.raises(kvfabric.InvalidArgumentError, match="contiguous bytes"):
            kvfabric.StepPlan.deserialize(view)
    assert kvfabric.StepPlan.deserialize(bytes(doubled[::2])) == plan
    built = kvfabric.StepPlan(step=4, ops=[kvfabric.PlanOp.swap_out(0, 3, 1),
                                           kvfabric.PlanOp.swap_in(0, 1, 3)])
    assert kvfabric.StepPlan.deserialize(built.serialize()) == built
    assert built.count("swap_out") == 1 and kvfabric.plan_waves(built.ops) == [0, 1]


def test_errors_carry_code_and_message(config):
    c = kvfabric.Coordinator(config)
    with pytest.raises(kvfabric.SequenceNotFoundError) as missing:
        c.append(99, 1)
    assert missing.value.code == "SequenceNotFound"
    assert missing.value.message == "Sequence not found: S99"
    assert isinstance(missing.value, kvfabric.Error)
    c.admit(1, [1, 2, 3])
    with pytest.raises(kvfabric.Error) as exists:
        c.admit(1, [4, 5, 6])
    assert exists.value.code == "InvalidOperation" and "S1" in exists.value.message
    with pytest.raises(kvfabric.InvalidArgumentError):
        c.admit(2, [])  # an empty prompt
    with pytest.raises(kvfabric.InvalidArgumentError, match="replica 5 is out of range"):
        c.replica_stats(5)


def test_a_refused_call_changes_nothing(config):
    config.cache.num_blocks = 8
    config.cache.host_num_blocks = 0
    c = kvfabric.Coordinator(config)
    c.admit(1, list(range(100)))  # 7 blocks of 8
    c.step()
    before = (c.stats(), c.replica_stats(0), c.query(1), c.tenant_stats(""))
    with pytest.raises(kvfabric.OutOfMemoryError) as refused:
        c.admit(2, list(range(500, 548)))  # 3 blocks; seq 1 has the same priority
    assert "nothing was changed" in refused.value.message
    assert (c.stats(), c.replica_stats(0), c.query(1)) == before[:3]
    assert c.tenant_stats("").refused == before[3].refused + 1  # only the refusal is counted
    with pytest.raises(kvfabric.SequenceNotFoundError):
        c.query(2)
    # The next plan is what it would have been without the refused request.
    c.append(1, 1)
    twin = kvfabric.Coordinator(config)
    twin.admit(1, list(range(100)))
    twin.step()
    twin.append(1, 1)
    assert c.step().serialize() == twin.step().serialize()


def test_a_refused_batch_append_says_how_far_it_got(config):
    c = kvfabric.Coordinator(config)
    c.admit(1, list(range(32)))
    c.admit(2, list(range(100, 132)))
    with pytest.raises(kvfabric.Error) as refused:
        c.append([1, 2, 77], 1)
    assert refused.value.code == "SequenceNotFound" and refused.value.done == 2
    assert refused.value.message == "Sequence not found: S77"
    assert len(c.query(1).blocks) == 3 and len(c.query(2).blocks) == 3  # both grew


def test_tenants_and_quotas(config):
    c = kvfabric.Coordinator(config)
    c.set_tenant_quota("team-a", kvfabric.TenantQuota(max_sequences=1))
    with pytest.raises(kvfabric.InvalidArgumentError, match="max_host_blocks"):
        c.set_tenant_quota("team-a", kvfabric.TenantQuota(max_blocks=2, max_host_blocks=3))
    assert c.tenant_quota("team-a").max_sequences == 1
    c.admit(1, list(range(20)), tenant="team-a")
    with pytest.raises(kvfabric.ResourceExhaustedError, match="max_sequences"):
        c.admit(2, list(range(20)), tenant="team-a")
    assert c.query(1).tenant == "team-a"
    assert c.tenant_stats("team-a").sequences == 1 and "team-a" in c.tenants()
    c.step()
    # Another tenant's salt does not see team-a's cached prompt.
    assert c.cached_tokens(0, list(range(20)), tenant="team-a") == 16
    assert c.cached_tokens(0, list(range(20)), tenant="team-b") == 0


def test_admission_costs_say_where_admit_goes_and_change_nothing(config):
    config.topology.dp = 3
    c = kvfabric.Coordinator(config)
    c.admit(1, list(range(48)))
    c.step()
    holder = c.query(1).replica
    before = [c.replica_stats(r) for r in range(3)]
    costs = c.admission_costs(list(range(48)))
    assert [x.replica for x in costs] == [0, 1, 2]
    assert costs[holder].cached_tokens == 48 and costs[holder].migration_source is None
    others = [x for x in costs if x.replica != holder]
    assert all(x.migration_source == holder and x.migrated_tokens == 48 for x in others)
    assert all(x.has_room == (x.blocks_needed <= x.blocks_available) for x in costs)
    assert [c.replica_stats(r) for r in range(3)] == before and c.stats().admitted == 1
    chosen = kvfabric.cheapest_with_room(costs)
    assert chosen == min(costs, key=lambda x: (x.cost, x.replica)).replica
    assert c.admit(2, list(range(48))).replica == chosen
    with pytest.raises(kvfabric.InvalidArgumentError, match="the prompt is empty"):
        c.admission_costs([])


def test_dp2_fork_migrates(config):
    config.topology.dp = 2
    c = kvfabric.Coordinator(config)
    c.admit(1, list(range(40)))
    c.step()
    assert c.fork(1, 2, replica=1) == 1
    plan = c.step()
    migrations = [op for op in plan.ops if op.kind == "migrate"]
    assert len(migrations) == 3 and {(op.replica, op.dst_replica) for op in migrations} == {(0, 1)}
    assert plan.count("migrate") == 3


# --- RankCache on the CPU backend ------------------------------------------------------------


def attention_reference(q, k, v, first):
    """float64 causal attention: q [m, hq, d] for positions first.., k/v [n, hkv, d]."""
    m, hq, d = q.shape
    group = hq // k.shape[1]
    out = np.empty((m, hq, d))
    for i in range(m):
        pos = first + i
        for h in range(hq):
            s = k[: pos + 1, h // group].astype(np.float64) @ q[i, h] / np.sqrt(d)
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ v[: pos + 1, h // group]
    return out


def test_rank_cache_runs_a_plan_and_attention_matches_numpy(config):
    c = kvfabric.Coordinator(config)
    cache = kvfabric.RankCache(config)  # CPU backend, one-rank local transport
    assert cache.layout.num_q_heads == 4 and cache.layout.num_kv_heads == 2
    rng = np.random.default_rng(1)
    n, bs = 37, config.cache.block_size
    c.admit(5, list(range(n)))
    plan = c.step()
    cache.execute(plan)
    blocks = cache.block_table(5)
    assert blocks == plan.tables[0].blocks and cache.next_step == 1
    k = rng.standard_normal((n + 1, 2, 16)).astype(np.float32)
    v = rng.standard_normal((n + 1, 2, 16)).astype(np.float32)
    q = rng.standard_normal((n + 1, 4, 16)).astype(np.float32)
    slots = [blocks[p // bs] * bs + p % bs for p in range(n)]
    cache.append_kv(0, k[:n], v[:n], np.array(slots))
    out = cache.prefill_attention(0, q[:n], [0, n], [n], [blocks])
    assert out.shape == (n, 4, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, attention_reference(q[:n], k[:n], v[:n], 0), atol=1e-5)
    gathered_k, gathered_v = cache.gather_kv(0, blocks, n)
    assert np.array_equal(gathered_k, k[:n]) and np.array_equal(gathered_v, v[:n])

    # A decode step: one more slot, its K/V, one query token over the whole context.
    c.append(5, 1)
    cache.execute(c.step())
    blocks = cache.block_table(5)
    cache.append_kv(0, k[n:], v[n:], [blocks[n // bs] * bs + n % bs])
    out, mass = cache.decode_attention(0, q[n:], [blocks], [n + 1], attention_mass=True)
    np.testing.assert_allclose(out, attention_reference(q[n:], k, v, n), atol=1e-5)
    assert mass.shape == (1, n + 1) and abs(mass.sum() - 4.0) < 1e-4  # 4 heads, each sums to 1
    # float16 queries give float16 outputs; `out` is filled in place.
    into = np.zeros((1, 4, 16), np.float16)
    assert cache.decode_attention(0, q[n:].astype(np.float16), [blocks], [n + 1], out=into) is into
    np.testing.assert_allclose(into, attention_reference(q[n:], k, v, n), atol=2e-2)
    # Sizes checked before the outputs are allocated (these were MemoryErrors for terabytes).
    with pytest.raises(kvfabric.InvalidArgumentError, match="tokens need"):
        cache.gather_kv(0, blocks, 2**32 - 1)
    with pytest.raises(kvfabric.InvalidArgumentError, match=r"context_lens\[0\] = 4294967295"):
        cache.decode_attention(0, q[n:], [blocks], [2**32 - 1], attention_mass=True)


def test_a_python_engine_compresses_with_its_own_attention_mass(config):
    """H2O end to end in one process: the decode kernel's attention mass feeds the rank's
    scores, the plan's score request brings them to the coordinator, and the next plan compacts
    the sequence to the budget, keeping exactly the kept rows' K/V."""
    c = kvfabric.Coordinator(config)
    cache = kvfabric.RankCache(config)
    rng = np.random.default_rng(3)
    n, bs = 60, config.cache.block_size
    k = rng.standard_normal((n + 8, 2, 16)).astype(np.float32)
    v = rng.standard_normal((n + 8, 2, 16)).astype(np.float32)
    k[11] *= 8  # a heavy hitter for most queries' directions
    c.admit(1, list(range(n)), compression={
        "policy": "h2o", "budget_tokens": 24, "recent_tokens": 4, "interval_steps": 1})
    origin = list(range(n))  # cached position -> row of k and v
    length, compactions = n, []
    for step in range(6):
        plan = cache.receive_and_execute(c.step())
        for seq, _, scores in cache.reported_scores():
            c.report_attention(seq, plan.step, scores)
        for compaction in plan.compactions:
            compactions.append(compaction)
            origin = [origin[p] for first, count in compaction.kept for p in range(first, first + count)]
        table = plan.tables[0] if plan.tables else None
        blocks = cache.block_table(1)
        length = c.tokens_of(1)
        fresh = range(table.computed_tokens if table else length, length)
        rows = [origin[p] for p in fresh]
        if rows:
            cache.append_kv(0, k[rows], v[rows], [blocks[p // bs] * bs + p % bs for p in fresh])
        q = rng.standard_normal((1, 4, 16)).astype(np.float32)
        _, mass = cache.decode_attention(0, q, [blocks], [length], attention_mass=True)
        cache.accumulate_attention(1, mass[0])
        c.append(1, 1)
        origin.append(n + step)
    assert compactions and c.stats().compactions == len(compactions)
    assert 11 in origin  # the heavy hitter survived
    gathered_k, _ = cache.gather_kv(0, cache.block_table(1), length)
    assert np.array_equal(gathered_k, k[origin[:length]])
    with pytest.raises(kvfabric.InvalidArgumentError, match="budget_ratio"):
        c.admit(2, list(range(n)), compression={"policy": "snapkv", "budget_ratio": 0})
    with pytest.raises(kvfabric.InvalidArgumentError, match="unknown key 'speed'"):
        c.admit(2, list(range(n)), compression={"policy": "h2o", "speed": 1})
    with pytest.raises(kvfabric.InvalidArgumentError, match="layers_per_group .* makes no groups"):
        c.admit(2, list(range(n)), compression={"policy": "pyramid", "budget_tokens": 40,
                                                "window_tokens": 8})
    with pytest.raises(kvfabric.InvalidArgumentError, match="compression.beta"):
        c.admit(2, list(range(n)), compression={"policy": "pyramid", "budget_tokens": 40,
                                                "beta": 0.5})
    with pytest.raises(kvfabric.InvalidArgumentError):
        cache.accumulate_attention(1, np.full(length + 5, 1.0, np.float32))


def test_a_python_engine_runs_pyramid_through_each_layer_groups_view(config):
    """PyramidKV in one process: the model's 2 layers as 2 layer groups; after the votes come,
    the plan regroups the sequence, and each layer reads back exactly the rows its group keeps,
    through the group's view and table."""
    config.cache.layers_per_group = 1
    c = kvfabric.Coordinator(config)
    cache = kvfabric.RankCache(config)
    rng = np.random.default_rng(5)
    n, bs = 64, config.cache.block_size
    k = rng.standard_normal((2, n, 2, 16)).astype(np.float32)  # [layer, token, head, dim]
    v = rng.standard_normal((2, n, 2, 16)).astype(np.float32)
    c.admit(1, list(range(n)), compression={
        "policy": "pyramid", "budget_tokens": 24, "window_tokens": 4, "beta": 3})
    plan = cache.receive_and_execute(c.step())  # the prefill
    blocks = cache.block_table(1)
    for layer in range(2):
        cache.append_kv(layer, k[layer], v[layer], [blocks[p // bs] * bs + p % bs for p in range(n)])
    votes = np.where(np.arange(n) % 10 == 3, 5.0, 0.5)
    kept = {}
    for _ in range(4):
        plan = cache.receive_and_execute(c.step())
        for request in plan.score_requests:
            c.report_attention(request.seq, plan.step, votes.tolist())
        for compaction in plan.compactions:
            assert compaction.layer_group is not None
            kept[compaction.layer_group] = [p for first, count in compaction.kept
                                            for p in range(first, first + count)]
    assert sorted(kept) == [0, 1] and len(kept[1]) < len(kept[0]) <= n
    assert set(kept[1]) <= set(kept[0])  # nested
    assert all(t in kept[1] for t in range(3, 60, 10))  # the heavy votes survive the deepest
    tables = cache.group_tables()[1]
    assert [t.layer_group for t in tables] == [0, 1] and 1 not in cache.tables()
    for layer in range(2):
        table = tables[layer]
        got_k, got_v = cache.gather_kv(layer, table.blocks, table.num_tokens, group_view=True)
        assert np.array_equal(got_k, k[layer][kept[layer]])
        assert np.array_equal(got_v, v[layer][kept[layer]])
    with pytest.raises(kvfabric.InvalidArgumentError, match="block_table has 1 blocks"):
        cache.gather_kv(0, tables[1].blocks, 3 * bs * 2, group_view=True)


def test_a_transport_outlives_its_caches(config):
    transport = kvfabric.Transport.local()
    cache = kvfabric.RankCache(config, transport=transport)
    with pytest.raises(kvfabric.InvalidOperationError, match="1 RankCache"):
        transport.close()
    del cache
    transport.close()
    with pytest.raises(kvfabric.InvalidOperationError, match="closed"):
        transport.barrier()


def test_a_plan_of_the_wrong_step_is_refused_and_changes_nothing(config):
    cache = kvfabric.RankCache(config)
    with pytest.raises(kvfabric.InvalidOperationError, match="expects step 0"):
        cache.execute(kvfabric.StepPlan(step=3))
    with pytest.raises(kvfabric.Error, match="B999"):
        cache.execute(kvfabric.StepPlan(step=0, ops=[kvfabric.PlanOp.swap_out(0, 999, 0)]))
    assert cache.next_step == 0 and cache.stats.steps == 0
    cache.execute(kvfabric.StepPlan(step=0))
    assert cache.next_step == 1


@pytest.mark.parametrize(
    "key, message",
    [
        (np.zeros((3, 2, 16), np.float64), "key has dtype float64; expected float32 or float16"),
        (np.zeros((3, 2, 16), np.int32), "key has dtype int32"),
        (np.zeros((3, 3, 16), np.float32), "dimension 1 (this rank's KV heads) must be 2"),
        (np.zeros((3, 2, 8), np.float32), "dimension 2 (head_dim) must be 16"),
        (np.zeros((3, 32), np.float32), "key must have 3 dimensions"),
        (np.zeros((3, 2, 32), np.float32)[:, :, ::2], "key (shape (3, 2, 16)) is not C-contiguous"),
        ([[[0.0] * 16] * 2] * 3, "key must be a NumPy array (got list)"),
    ],
)
def test_bad_numpy_input_is_refused_by_name(config, key, message):
    cache = kvfabric.RankCache(config)
    value = np.zeros((3, 2, 16), np.float32)
    with pytest.raises(ValueError) as refused:  # InvalidArgumentError is a ValueError
        cache.append_kv(0, key, value, [0, 1, 2])
    assert message in str(refused.value)
    assert refused.value.code == "InvalidArgument"


def test_a_slot_of_minus_one_skips_its_token(config):
    cache = kvfabric.RankCache(config)
    k = np.arange(2 * 2 * 16, dtype=np.float32).reshape(2, 2, 16)
    for slots in ([-1, 5], np.array([-1, 5], np.int64)):
        cache.append_kv(0, k, k, slots)
    keys, _ = cache.gather_kv(0, [0], 6)
    assert np.array_equal(keys[5], k[1])
    assert not keys[:5].any()  # nothing was written for the skipped token


def test_bools_are_no_ids_or_slots(config):
    cache = kvfabric.RankCache(config)
    k = np.zeros((2, 2, 16), np.float32)
    with pytest.raises(kvfabric.InvalidArgumentError, match=r"slot_mapping\[0\] must be an integer \(got bool\)"):
        cache.append_kv(0, k, k, [True, False])
    with pytest.raises(kvfabric.InvalidArgumentError, match="got bool"):
        cache.append_kv(0, k, k, [np.bool_(True), 0])
    c = kvfabric.Coordinator(config)
    c.admit(1, list(range(20)))
    with pytest.raises(kvfabric.InvalidArgumentError, match="seqs must be an integer \\(got bool\\)"):
        c.append(True, 1)
    with pytest.raises(kvfabric.InvalidArgumentError, match="an id must be an integer \\(got bool\\)"):
        c.free(True)
    with pytest.raises(kvfabric.InvalidArgumentError, match=r"id -1 is outside \[0, "):
        c.free(-1)
    with pytest.raises(kvfabric.InvalidArgumentError, match=r"id 18446744073709551616 is outside"):
        c.free(2**64)
    assert c.tokens_of(1) == 20


def test_uint64_block_ids_past_int64_are_refused(config):
    cache = kvfabric.RankCache(config)
    q = np.zeros((1, 4, 16), np.float32)
    for big in (2**64 - 1, 2**63 + 5):
        with pytest.raises(kvfabric.InvalidArgumentError, match=f"= {big} is not a block id"):
            cache.decode_attention(0, q, np.array([[0, big]], np.uint64), [16])


def test_masked_or_bool_attention_mass_is_refused(config):
    c = kvfabric.Coordinator(config)
    cache = kvfabric.RankCache(config)
    c.admit(1, list(range(20)), compression={"policy": "h2o", "budget_tokens": 8})
    cache.execute(c.step())
    with pytest.raises(kvfabric.InvalidArgumentError, match="mass is a masked array"):
        cache.accumulate_attention(1, np.ma.array([1.0, 1e9], mask=[False, True]))
    with pytest.raises(kvfabric.InvalidArgumentError, match="mass must hold numbers .got dtype bool"):
        cache.accumulate_attention(1, np.array([True, True]))
    assert cache.attention_scores(1) == []


def test_attention_refuses_non_finite_queries_and_overlapping_outputs(config):
    cache = kvfabric.RankCache(config)
    k = np.ones((16, 2, 16), np.float32)
    cache.append_kv(0, k, k, list(range(16)))
    q = np.ones((2, 4, 16), np.float32)
    ref = cache.decode_attention(0, q, [[0], [0]], [16, 8])
    bad = q.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(kvfabric.InvalidArgumentError, match=r"query\[token 1, head 2, dim 3\] is not finite"):
        cache.decode_attention(0, bad, [[0], [0]], [16, 8])
    buf = np.zeros((3, 4, 16), np.float32)
    buf[:2] = q
    with pytest.raises(kvfabric.InvalidArgumentError, match="output overlaps the query without being it"):
        cache.decode_attention(0, buf[:2], [[0], [0]], [16, 8], out=buf[1:])
    assert np.array_equal(buf[:2], q) and not buf[2].any()
    same = q.copy()
    cache.decode_attention(0, same, [[0], [0]], [16, 8], out=same)  # the query itself is fine
    assert np.array_equal(same, ref)


def test_plan_bytes_in_any_buffer_and_derived_config_values_of_invalid_configs(config):
    c = kvfabric.Coordinator(config)
    c.admit(1, list(range(20)))
    cache = kvfabric.RankCache(config)
    cache.receive_and_execute(bytearray(c.step().serialize()))
    cache.receive_and_execute(memoryview(c.step().serialize()))
    assert cache.next_step == 2
    with pytest.raises(kvfabric.InvalidArgumentError, match="contiguous bytes"):
        cache.receive_and_execute(memoryview(c.step().serialize())[::2])
    assert cache.next_step == 2
    config.topology.tp = 0
    with pytest.raises(kvfabric.InvalidArgumentError, match="topology.tp must be >= 1"):
        config.local_kv_heads


class _FakeCudaArray:
    """Looks like a CuPy/PyTorch CUDA tensor to the bindings (it is never read)."""

    __cuda_array_interface__ = {"shape": (3, 2, 16), "typestr": "<f4", "data": (0, False),
                                "version": 3}


def test_a_cuda_array_is_refused_by_the_cpu_backend(config):
    cache = kvfabric.RankCache(config)
    value = np.zeros((3, 2, 16), np.float32)
    with pytest.raises(kvfabric.InvalidArgumentError,
                       match="key is a CUDA array, but this cache's backend is the CPU backend"):
        cache.append_kv(0, _FakeCudaArray(), value, [0, 1, 2])
    assert cache.stats.steps == 0


def test_bad_metadata_and_outputs_are_refused(config):
    cache = kvfabric.RankCache(config)
    k = np.zeros((3, 2, 16), np.float32)
    with pytest.raises(ValueError, match="slot_mapping has 2 entries; key has 3 tokens"):
        cache.append_kv(0, k, k, [0, 1])
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = -7"):
        cache.append_kv(0, k, k, [0, -7, 2])
    with pytest.raises(ValueError, match="value has shape"):
        cache.append_kv(0, k, np.zeros((2, 2, 16), np.float32), [0, 1, 2])
    q = np.zeros((1, 4, 16), np.float32)
    with pytest.raises(ValueError, match="context_lens has 2 entries"):
        cache.decode_attention(0, q, [[0]], [1, 1])
    with pytest.raises(ValueError, match="block_tables has 2 rows"):
        cache.decode_attention(0, q, [[0], [1]], [1])
    read_only = np.zeros((1, 4, 16), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        cache.decode_attention(0, q, [[0]], [1], out=read_only)
    with pytest.raises(ValueError, match="out has dtype float16"):
        cache.decode_attention(0, q, [[0]], [1], out=np.zeros((1, 4, 16), np.float16))
    with pytest.raises(ValueError, match="query_start must rise from 0"):
        cache.prefill_attention(0, q, [0, 2], [1], [[0]])
    # Values the C++ side checks (a block outside the pool) are refused there, by name too.
    with pytest.raises(kvfabric.Error, match="64"):
        cache.decode_attention(0, q, [[64]], [1])


def test_long_calls_release_the_gil(config):
    """A Python thread keeps running while another waits in attention: the counter thread only
    advances while the GIL is free."""
    config.cache.num_blocks = 512
    config.model.head_dim = 128
    c = kvfabric.Coordinator(config)
    cache = kvfabric.RankCache(config, backend=kvfabric.Backend.cpu(threads=1))
    n = 4096
    c.admit(1, list(range(n)))
    cache.execute(c.step())
    blocks = cache.block_table(1)
    q = np.ones((n, 4, 128), np.float32)
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    try:
        start = ticks[0]
        cache.prefill_attention(0, q, [0, n], [n], [blocks])  # a few hundred ms on one core
        during = ticks[0] - start
    finally:
        done.set()
        counter.join()
    assert during > 1000, f"the counter thread ran {during} times during prefill attention"
