"""A tensor-parallel serving engine in Python on 2 MPI ranks (tp = 2), checked against NumPy.

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
        mpirun -n 2 --oversubscribe python3 tp_engine.py

Rank 0 runs the Coordinator (the scheduler). Every step it broadcasts the StepPlan's bytes
(RankCache.receive_and_execute: the ranks agree, then each executes its share: copy-on-write
copies, swaps), and with mpi4py the token ids of the sequences the plan lists. Each rank then
runs the "forward pass" for its shard: it writes the K/V of the tokens the plan's tables ask for
(its KV heads only) and computes attention for its query heads, prefill or decode. Rank 0
gathers the heads and compares them with a float64 NumPy reference over the whole prompt.

K, V and Q of a token are a pure function of (token id, position, layer), so a prompt that
shares a cached prefix must attend to exactly the K/V its prefix computed, and K/V that a swap
or a copy moved must come back bit for bit. Exits non-zero when a check fails.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
from mpi4py import MPI

import kvfabric

TOLERANCE = 1e-4  # max |engine - reference|: f32 K/V and f32 kernels against float64

CONFIG = """
model: {name: py-tp-engine, num_layers: 2, num_query_heads: 8, num_kv_heads: 4, head_dim: 32, dtype: f32}
cache: {block_size: 16, num_blocks: 8, host_num_blocks: 16, kv_dtype: f32}
topology: {tp: 2, dp: 1}
"""


def token_kv(token: int, pos: int, layer: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """[2, kv_heads, head_dim]: K and V of one token of one layer, every KV head."""
    return np.random.default_rng([token, pos, layer, 0]).standard_normal((2, kv_heads, head_dim))


def token_q(token: int, pos: int, layer: int, q_heads: int, head_dim: int) -> np.ndarray:
    return np.random.default_rng([token, pos, layer, 1]).standard_normal((q_heads, head_dim))


def reference(tokens: list[int], first: int, layer: int, cfg: kvfabric.ModelConfig) -> np.ndarray:
    """float64 causal attention of positions [first, len(tokens)) over the whole sequence."""
    hq, hkv, d = cfg.num_query_heads, cfg.num_kv_heads, cfg.head_dim
    kv = np.stack([token_kv(t, p, layer, hkv, d) for p, t in enumerate(tokens)])  # [n, 2, hkv, d]
    out = np.empty((len(tokens) - first, hq, d))
    for i, pos in enumerate(range(first, len(tokens))):
        q = token_q(tokens[pos], pos, layer, hq, d)
        for h in range(hq):
            g = h // (hq // hkv)
            scores = kv[: pos + 1, 0, g] @ q[h] / np.sqrt(d)
            w = np.exp(scores - scores.max())
            out[i, h] = (w / w.sum()) @ kv[: pos + 1, 1, g]
    return out


def forward(cache: kvfabric.RankCache, plan: kvfabric.StepPlan, tokens: dict[int, list[int]],
            cfg: kvfabric.ModelConfig, block_size: int) -> dict[tuple[int, int], np.ndarray]:
    """This rank's share of the forward pass: K/V of the tables' uncomputed tokens, then
    attention of those tokens for this rank's query heads. Returns {(seq, layer): output}."""
    lay = cache.layout
    kv_heads = slice(lay.first_kv_head, lay.first_kv_head + lay.num_kv_heads)
    q_heads = slice(lay.first_q_head, lay.first_q_head + lay.num_q_heads)
    work = [t for t in plan.tables if t.computed_tokens < t.num_tokens]
    outputs = {}
    for layer in range(cfg.num_layers):
        prefill, decode = [], []
        for table in work:
            seq, first, n = table.seq, table.computed_tokens, table.num_tokens
            blocks = cache.block_table(seq)
            positions = range(first, n)
            slots = [blocks[p // block_size] * block_size + p % block_size for p in positions]
            kv = np.stack([token_kv(tokens[seq][p], p, layer, cfg.num_kv_heads, cfg.head_dim)
                           for p in positions])[:, :, kv_heads].astype(np.float32)
            cache.append_kv(layer, np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1]),
                            slots)
            q = np.stack([token_q(tokens[seq][p], p, layer, cfg.num_query_heads, cfg.head_dim)
                          for p in positions])[:, q_heads].astype(np.float32)
            (decode if n - first == 1 else prefill).append((seq, n, blocks, q))
        if decode:  # one token per sequence: the decode kernel
            out = cache.decode_attention(layer, np.concatenate([q for *_, q in decode]),
                                         [b for _, _, b, _ in decode], [n for _, n, _, _ in decode])
            for i, (seq, *_) in enumerate(decode):
                outputs[(seq, layer)] = out[i : i + 1]
        if prefill:  # new prompts (past their cached prefix) and recomputed sequences
            starts = np.cumsum([0] + [len(q) for *_, q in prefill])
            out = cache.prefill_attention(layer, np.concatenate([q for *_, q in prefill]), starts,
                                          [n for _, n, _, _ in prefill],
                                          [b for _, _, b, _ in prefill])
            for i, (seq, *_) in enumerate(prefill):
                outputs[(seq, layer)] = out[starts[i] : starts[i + 1]]
    return outputs


class Scheduler:
    """Rank 0's scripted workload: prompts, decode steps, a shared prefix, a fork, a release and
    a high-priority newcomer that forces swaps."""

    def __init__(self, coordinator: kvfabric.Coordinator) -> None:
        self.c = coordinator
        self.tokens: dict[int, list[int]] = {}
        self.seen = {"copy": 0, "swap_out": 0, "swap_in": 0, "released": 0, "cached_tokens": 0}
        rng = np.random.default_rng(7)
        self.prompt = [int(t) for t in rng.integers(0, 30000, 40)]
        self.other = [int(t) for t in rng.integers(0, 30000, 21)]

    def admit(self, seq: int, prompt: list[int], priority: int = 0) -> None:
        placement = self.c.admit(seq, prompt, priority)
        self.seen["cached_tokens"] += placement.cached_tokens
        self.tokens[seq] = list(prompt)

    def decode(self, seqs: list[int]) -> None:
        running = [s for s in seqs if s in self.tokens and not self.c.query(s).swapped]
        self.c.append(running, 1)
        for s in running:
            self.tokens[s].append((s * 131 + len(self.tokens[s])) % 30000)

    def script(self, step: int) -> None:
        if step == 0:
            self.admit(1, self.prompt)
            self.admit(2, self.other)
        elif step == 1:
            self.decode([1, 2])
        elif step == 2:
            self.admit(3, self.prompt[:32] + [11, 12, 13, 14, 15])  # 2 cached blocks
            self.c.fork(1, 4)  # shares seq 1's partly filled last block ...
            self.tokens[4] = list(self.tokens[1])
            self.decode([1, 4])  # ... which each append now copies (copy-on-write)
        elif step == 3:
            self.c.free(2)
            del self.tokens[2]
            self.decode([1, 3, 4])
        elif step == 4:
            # A newcomer of a higher priority takes 4 blocks the pool does not have free: the
            # lower-priority sequences are swapped out to the host tier.
            self.admit(5, list(range(100, 164)), priority=1)
        elif step == 5:
            self.c.free(5)
            del self.tokens[5]
        else:
            self.decode(sorted(self.tokens))

    def step(self) -> kvfabric.StepPlan:
        plan = self.c.step()
        for kind in ("copy", "swap_out", "swap_in"):
            self.seen[kind] += plan.count(kind)
        self.seen["released"] += len(plan.released)
        return plan


def main() -> int:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    config = kvfabric.Config.parse(CONFIG)
    cfg = config.model
    transport = kvfabric.Transport.mpi()  # borrows the MPI mpi4py initialized
    cache = kvfabric.RankCache(config, transport=transport)
    scheduler = Scheduler(kvfabric.Coordinator(config)) if rank == 0 else None

    checks, worst, failures = 0, 0.0, []
    steps = 9
    for step in range(steps):
        plan_bytes = None
        if rank == 0:
            scheduler.script(step)
            plan_bytes = scheduler.step().serialize()
        plan = cache.receive_and_execute(plan_bytes, root=0)  # every rank: the same StepPlan
        tokens = comm.bcast(
            {t.seq: scheduler.tokens[t.seq] for t in plan.tables} if rank == 0 else None, root=0)
        outputs = forward(cache, plan, tokens, cfg, config.cache.block_size)
        shards = comm.gather(outputs, root=0)  # every rank's query heads, in rank order
        if rank == 0:
            for seq, layer in sorted(outputs):
                got = np.concatenate([shard[(seq, layer)] for shard in shards], axis=1)
                table = next(t for t in plan.tables if t.seq == seq)
                want = reference(tokens[seq], table.computed_tokens, layer, cfg)
                error = float(np.abs(got - want).max())
                worst = max(worst, error)
                checks += 1
                if not error <= TOLERANCE:
                    failures.append(f"step {step}, seq {seq}, layer {layer}: error {error:.3g}")

    digests = transport.all_gather(cache.tables_digest)
    if rank == 0:
        seen = scheduler.seen
        # The workload must have exercised what it is for; otherwise the check proves little.
        for what, at_least in (("copy", 1), ("swap_out", 1), ("swap_in", 1), ("released", 1),
                               ("cached_tokens", 32)):
            if seen[what] < at_least:
                failures.append(f"the workload produced {seen[what]} {what}, expected >= {at_least}")
        if len(set(digests)) != 1:
            failures.append(f"the shards' block tables differ: {digests}")
        scheduler.c.verify_integrity()
        print(f"tp engine: {steps} steps on {comm.Get_size()} ranks, {checks} attention checks, "
              f"max abs error {worst:.2e} (tolerance {TOLERANCE:g}); plans: {seen}")
        for failure in failures:
            print("FAILED:", failure)
    failed = comm.bcast(bool(failures) if rank == 0 else None, root=0)
    del cache  # the cache before its transport, the transport before mpi4py finalizes MPI
    failed = not transport_outlives_its_calls(transport, rank) or failed
    transport.close()
    return 1 if failed else 0


def transport_outlives_its_calls(transport, rank: int) -> bool:
    """close() while another thread waits in a collective is refused (it freed the transport
    under the call: a crash), and a timeout of float('inf') waits for ever (it overflowed, and
    every later wait failed at once)."""
    transport.set_timeout(float("inf"))
    transport.barrier()
    transport.set_timeout(30)  # a failure below ends the job rather than hanging it
    if rank == 1:
        time.sleep(0.5)  # rank 0's barrier waits for this one
        transport.barrier()
        return True
    entered, failures = threading.Event(), []

    def wait_in_barrier():
        entered.set()
        try:
            transport.barrier()
        except kvfabric.Error as e:
            failures.append(f"the worker's barrier failed: {e}")

    worker = threading.Thread(target=wait_in_barrier)
    worker.start()
    entered.wait()
    time.sleep(0.1)  # the worker takes the transport and releases the GIL in barrier()
    try:
        transport.close()
        failures.append("close() during another thread's barrier() was not refused")
    except kvfabric.InvalidOperationError as e:
        if "call(s) on other threads" not in str(e):
            failures.append(f"close() was refused for another reason: {e}")
    worker.join()
    for failure in failures:
        print("FAILED:", failure)
    return not failures


if __name__ == "__main__":
    sys.exit(main())
