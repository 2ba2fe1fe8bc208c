#!/usr/bin/python3
"""Draws the figure of kvfabric-bench --json results, whichever routine wrote them.

  launch/plot.py build/demo-replay.json -o build/demo-replay.png
  launch/plot.py build/replay-lru.json build/replay-full.json --reference -o replay.png
  launch/plot.py build/scale/dp*.json -o launch/figures/coordinator_scale.png

The routine is read from each file's "routine" field (several files must come from the same
routine; each becomes a series or a bar). Figures: alloc; replay (hit ratio and time against
capacity); replay --dp (one file: hit ratio, prefill tokens saved, queue length over time and
admission-time distribution per routing; with --compression runs: memory per sequence, hit ratio,
compaction copies and score bytes, plan execution per policy; several files with different dp:
the scale figure);
transfer; attention; quant; copy and swap; seed-ops; seed-bench (launch/seed-bench/run --json);
compress (attention error and mass kept against budget, per policy and workload).
`config` results hold text only and have no figure. What each panel shows: docs/plotting.md.
Exit status 2 when a file cannot be plotted (not JSON, no known routine, no figure).

Uses the system python3 (python3-matplotlib, installed by launch/setup.sh).
"""

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

CANNOT_PLOT = 2

# performance-anchors.md section 1.3: block-granular LRU simulation of the Mooncake conversation
# trace (prefix-only lookups, 512-token blocks); not measured by this project.
REFERENCE_LRU = {1_000_000: 0.0532, 3_000_000: 0.1355, 10_000_000: 0.2852, 50_000_000: 0.3635}

# Routines whose results have no figure, and why.
NO_FIGURE = {
    "config": "`kvfabric-bench config` results are the effective config as text; "
              "there is nothing to plot",
}


class CannotPlot(Exception):
    pass


def kind_of(path, results):
    if not isinstance(results, dict) or "routine" not in results:
        raise CannotPlot(f"{path}: not kvfabric-bench --json results (no \"routine\" field)")
    routine = results["routine"]
    if routine in NO_FIGURE:
        raise CannotPlot(f"{path}: {NO_FIGURE[routine]}")
    if routine == "replay" and "dp" in results:
        return "replay-dp"
    if routine == "swap":
        return "copy"
    if routine not in FIGURES:
        known = ", ".join(sorted(set(FIGURES) - {"replay-dp"}))
        raise CannotPlot(f"{path}: no figure for routine \"{routine}\" (known: {known})")
    return routine


def label_of(path):
    return path.rsplit("/", 1)[-1].removesuffix(".json")


def finish(fig, title):
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- replay (one cache): hit ratio and time per request against capacity ---------------------

def plot_replay(inputs, args):
    fig, (hit_ax, time_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    for index, (path, results) in enumerate(inputs):
        color = f"C{index}"
        options = results.get("options", {})
        blocks = "full blocks only" if options.get("full_blocks_only") else "partial last block cached"
        label = f"{options.get('policy', '?')}, {blocks}"
        runs = sorted(results["runs"], key=lambda r: r["capacity_tokens"])
        finite = [r for r in runs if r["capacity_tokens"] > 0]
        for r in runs:
            if r["capacity_tokens"] == 0:
                hit_ax.axhline(r["block_hit_ratio"], color=color, linestyle="--", linewidth=1,
                               label=f"{label}, unlimited: {r['block_hit_ratio']:.4f}")
        if finite:
            xs = [r["capacity_tokens"] for r in finite]
            hit_ax.plot(xs, [r["block_hit_ratio"] for r in finite], "o-", color=color, label=label)
            time_ax.plot(xs, [r["mean_us_per_request"] for r in finite], "o-", color=color,
                         label=f"{label}, mean")
            time_ax.plot(xs, [r["p99_us_per_request"] for r in finite], "s--", color=color,
                         label=f"{label}, p99")
    if args.reference:
        xs = sorted(REFERENCE_LRU)
        hit_ax.plot(xs, [REFERENCE_LRU[x] for x in xs], "x", color="black", markersize=8,
                    label="reference LRU simulation (performance-anchors.md 1.3)")
    for ax in (hit_ax, time_ax):
        ax.set_xscale("log")
        ax.set_xlabel("cache capacity (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    hit_ax.set_ylabel("block hit ratio")
    hit_ax.set_ylim(bottom=0)
    hit_ax.set_title("Prompt blocks served from the cache")
    time_ax.set_ylabel("µs per request")
    time_ax.set_title("Prefix cache time per request (allocate + insert)")
    return finish(fig, f"{inputs[0][1].get('trace', 'trace')} through the block-granular prefix cache")


# --- replay --dp, one file: the demo figure ---------------------------------------------------

def hit_ratio_bars(ax, names, runs, colors):
    """One bar per run: the share of prompt tokens served from cache."""
    bars = ax.bar(names, [r["hit_ratio"] for r in runs], color=colors)
    ax.bar_label(bars, fmt="%.4f", fontsize=8)
    ax.set_ylabel("prompt tokens served from cache")
    ax.set_title("Hit ratio (local + migrated)")


def plot_replay_dp(inputs, args):
    if len(inputs) > 1 or args.figure == "scale":
        return plot_scale(inputs, args)
    path, results = inputs[0]
    runs = results["runs"]
    if len({r.get("compression", "none") for r in runs}) > 1:
        return plot_replay_compression(results, runs)
    names = [r["routing"] for r in runs]
    colors = [f"C{i}" for i in range(len(runs))]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (hit_ax, saved_ax), (queue_ax, admit_ax) = axes

    hit_ratio_bars(hit_ax, names, runs, colors)

    saved = [r["prefill_tokens_saved"] / 1e6 for r in runs]
    bars = saved_ax.bar(names, saved, color=colors)
    saved_ax.bar_label(bars, labels=[
        f"{s:.1f} M ({r['prefill_tokens_saved'] / max(r['prompt_tokens'], 1):.1%})"
        for s, r in zip(saved, runs)], fontsize=8)
    saved_ax.set_ylabel("million prompt tokens")
    saved_ax.set_title("Prefill tokens saved (not computed)")

    step_s = results.get("step_ms", 50) / 1000
    for r, color in zip(runs, colors):
        queue = r.get("queue_length")
        if not queue:
            continue
        span = queue["steps_per_point"]
        xs = [(i + 0.5) * span * step_s for i in range(len(queue["mean"]))]
        queue_ax.plot(xs, queue["mean"], color=color, linewidth=1,
                      label=f"{r['routing']} (max {r.get('max_waiting', max(queue['max']))})")
        queue_ax.fill_between(xs, queue["mean"], queue["max"], color=color, alpha=0.15, linewidth=0)
    queue_ax.set_xlabel(f"serving time (s; one step = {results.get('step_ms', 50):g} ms)")
    queue_ax.set_ylabel("waiting requests")
    queue_ax.set_title("Queue length (line: mean per point, band: up to the max)")

    for r, color in zip(runs, colors):
        histogram = r.get("admit_histogram")
        if not histogram:
            continue
        total = max(sum(histogram["counts"]), 1)
        edges, counts = histogram["edges_us"], histogram["counts"]
        admit_ax.stairs([c / total for c in counts], edges, color=color, label=r["routing"])
        quantiles = r.get("admit_quantiles_us", {})
        for q, style in (("p50", ":"), ("p99", "--")):
            if q in quantiles:
                admit_ax.axvline(quantiles[q], color=color, linestyle=style, linewidth=1)
    # Only the bins some admission fell in: the fixed edges span 1/8 µs to 64 ms.
    used = [i for r in runs for i, c in enumerate(r.get("admit_histogram", {}).get("counts", [])) if c]
    if used:
        edges = runs[0]["admit_histogram"]["edges_us"]
        admit_ax.set_xlim(edges[min(used)], edges[max(used) + 1])
    admit_ax.set_xscale("log")
    admit_ax.set_xlabel("µs per admission (Coordinator::admit; dotted p50, dashed p99)")
    admit_ax.set_ylabel("share of admissions")
    admit_ax.set_title("Admission time distribution")
    for ax in (queue_ax, admit_ax):
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    ranks = results.get("mpi_ranks", 0)
    where = f"{ranks} MPI ranks" if ranks else "coordinator only"
    return finish(fig, (
        f"replay --dp {results['dp']}: {runs[0]['requests']} requests, "
        f"{results['capacity_tokens'] / 2**20:.0f} Mi device + "
        f"{results.get('host_capacity_tokens', 0) / 2**20:.0f} Mi host tokens, "
        f"arrivals x{results.get('time_scale', 1):g}, {where}"))


# --- replay --dp --compression: what compression saves and costs ------------------------------

def plot_replay_compression(results, runs):
    routings = {r["routing"] for r in runs}
    names = [r["compression"].replace(":", ":\n").replace(",", ",\n") for r in runs]
    if len(routings) > 1:
        names = [f"{name}\n{r['routing']}" for name, r in zip(names, runs)]
    colors = [f"C{i}" for i in range(len(runs))]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (memory_ax, hit_ax), (copy_ax, exec_ax) = axes

    bars = memory_ax.bar(names, [r["kv_tokens_per_sequence"] for r in runs], color=colors)
    memory_ax.bar_label(bars, fmt="%.0f", fontsize=8)
    memory_ax.set_ylabel("KV tokens per running sequence (mean over steps)")
    memory_ax.set_title("Memory per sequence = what each decode step's attention reads")

    hit_ratio_bars(hit_ax, names, runs, colors)

    paired_bars(copy_ax, names, [r["compaction_copied_tokens"] / 1e6 for r in runs],
                "tokens the compactions copied (M, per shard)",
                [r["score_bytes"] / 2**20 for r in runs], "scores sent to rank 0 (MiB)")
    copy_ax.set_title("What compaction costs the plans")
    copy_ax.legend(fontsize=8)

    bars = exec_ax.bar(names, [r["executor_seconds"] for r in runs], color=colors)
    exec_ax.bar_label(bars, fmt="%.2f", fontsize=8)
    exec_ax.set_ylabel("seconds")
    exec_ax.set_title("Plan execution and the stand-in forward pass on the ranks (wall)")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelsize=8)
    ranks = results.get("mpi_ranks", 0)
    where = f"{ranks} MPI ranks" if ranks else "coordinator only"
    return finish(fig, (
        f"replay --dp {results['dp']} --tp {results.get('tp', 1)} with token compression: "
        f"{runs[0]['requests']} requests, {results['capacity_tokens'] / 2**20:.1f} Mi device "
        f"tokens, {where} (H2O/SnapKV on synthetic attention)"))


# --- replay --dp, several files: the scale study ----------------------------------------------

def plot_scale(inputs, args):
    points = []
    for path, results in inputs:
        chosen = [r for r in results["runs"] if r["routing"] == "global-migration"] or results["runs"]
        points.append((results["dp"], chosen[0]))
    points.sort(key=lambda p: p[0])
    dp = [p[0] for p in points]
    runs = [p[1] for p in points]
    fig, (time_ax, hit_ax, mem_ax) = plt.subplots(1, 3, figsize=(15, 4.5))
    time_ax.plot(dp, [r["admit_mean_us"] for r in runs], "o-", label="admission, mean")
    time_ax.plot(dp, [r["admit_p99_us"] for r in runs], "s--", label="admission, p99")
    time_ax.plot(dp, [r["matched_memcpy_us"] for r in runs], "^:",
                 label="memcpy of the matched prompt tokens")
    time_ax.set_ylabel("µs per admission")
    time_ax.set_title("Coordinator admission")
    time_ax.legend(fontsize=8)
    hit_ax.plot(dp, [r["hit_ratio"] for r in runs], "o-")
    hit_ax.set_ylabel("prompt tokens served from cache")
    hit_ax.set_ylim(0, 1)
    hit_ax.set_title("Hit ratio")
    mem_ax.plot(dp, [r["coordinator_bytes"] / 2**20 for r in runs], "o-")
    mem_ax.set_ylabel("MiB")
    mem_ax.set_title("Coordinator host memory")
    for ax in (time_ax, hit_ax, mem_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("replicas (dp)")
        ax.grid(True, alpha=0.3)
    for d, r in points:
        print(f"dp {d:5d}: {r['requests']} requests ({r['routing']}), admission "
              f"{r['admit_mean_us']:.2f} µs mean, p99 {r['admit_p99_us']:.1f}, memcpy "
              f"{r['matched_memcpy_us']:.2f} µs, hit ratio {r['hit_ratio']:.4f}, "
              f"coordinator {r['coordinator_bytes'] / 2**20:.0f} MiB")
    return finish(fig, "The coordinator against the number of replicas")


# --- alloc -------------------------------------------------------------------------------------

def plot_alloc(inputs, args):
    fig, (util_ax, queue_ax, ops_ax) = plt.subplots(1, 3, figsize=(15, 4.5))
    for index, (path, results) in enumerate(inputs):
        color = f"C{index}"
        label = label_of(path)
        runs = sorted(results["runs"], key=lambda r: r["block_size"])
        xs = [r["block_size"] for r in runs]
        util_ax.plot(xs, [r["peak_utilization"] for r in runs], "o-", color=color,
                     label=f"{label}: peak utilization")
        util_ax.plot(xs, [r["mean_utilization"] for r in runs], "s--", color=color,
                     label=f"{label}: mean utilization")
        util_ax.plot(xs, [r["mean_fragmentation"] for r in runs], "^:", color=color,
                     label=f"{label}: internal fragmentation (mean)")
        queue_ax.plot(xs, [r["mean_queue_seconds"] for r in runs], "o-", color=color,
                      label=f"{label}: mean")
        queue_ax.plot(xs, [r["p99_queue_seconds"] for r in runs], "s--", color=color,
                      label=f"{label}: p99")
        ops_ax.plot(xs, [r["ops_per_second"] / 1e6 for r in runs], "o-", color=color, label=label)
    util_ax.set_ylabel("share of the pool / of allocated slots")
    util_ax.set_title("Utilization and fragmentation")
    queue_ax.set_ylabel("trace seconds from arrival to admission")
    queue_ax.set_title("Queueing")
    ops_ax.set_ylabel("million block-manager calls / s")
    ops_ax.set_title("Block-manager throughput")
    for ax in (util_ax, queue_ax, ops_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return finish(fig, f"alloc: {inputs[0][1].get('trace', 'trace')} through the block manager")


# --- transfer ----------------------------------------------------------------------------------

def plot_transfer(inputs, args):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, pattern, title in ((axes[0], "one_direction", "R0 → R1"),
                               (axes[1], "both_directions", "R0 ↔ R1")):
        for index, (path, results) in enumerate(inputs):
            runs = sorted((r for r in results["runs"] if r["pattern"] == pattern),
                          key=lambda r: r["bytes"])
            if not runs:
                continue
            prefix = f"{label_of(path)}: " if len(inputs) > 1 else ""
            xs = [r["bytes"] / 2**20 for r in runs]
            ax.plot(xs, [r["raw_bytes_per_s"] / 1e9 for r in runs], "x", color="black",
                    label=f"{prefix}raw MPI_Send/Recv" if index == 0 else None)
            ax.plot(xs, [r["exchange_bytes_per_s"] / 1e9 for r in runs], "o", color=f"C{index}",
                    label=f"{prefix}exchange_blocks, one message")
            per_block = [r for r in runs if "per_block_bytes_per_s" in r]
            if per_block:
                ax.plot([r["bytes"] / 2**20 for r in per_block],
                        [r["per_block_bytes_per_s"] / 1e9 for r in per_block], "^",
                        color=f"C{index}", label=f"{prefix}exchange_blocks, per-block messages")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (MiB; points differ in block size and count)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("GB/s per direction")
    ranks = inputs[0][1].get("world_size", "?")
    return finish(fig, f"transfer: MPI block migration vs raw MPI of the same bytes ({ranks} ranks)")


# --- kernels -----------------------------------------------------------------------------------

def paired_bars(ax, names, left, left_label, right, right_label):
    """Two bars per name, side by side."""
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], left, 0.4, label=left_label)
    ax.bar([x + 0.2 for x in xs], right, 0.4, label=right_label)
    ax.set_xticks(list(xs), names)


def plot_attention(inputs, args):
    path, results = inputs[0]
    runs = results["runs"]
    names = [r["kv_dtype"] for r in runs]
    fig, (bw_ax, time_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    bw_ax.bar(names, [r["bytes_per_s"] / 1e9 for r in runs], color="C0")
    copy = "device copy (read + write)" if results.get("copy_counts_read_and_write") else "memcpy"
    bw_ax.axhline(results["copy_bytes_per_s"] / 1e9, color="black", linestyle="--",
                  label=f"{copy}, same run")
    if results.get("read_bytes_per_s"):
        bw_ax.axhline(results["read_bytes_per_s"] / 1e9, color="gray", linestyle=":",
                      label="streaming read, same run")
    bw_ax.set_ylabel("GB/s (KV as stored + queries + outputs)")
    bw_ax.set_title("Paged decode attention bandwidth")
    bw_ax.legend(fontsize=8)
    paired_bars(time_ax, names, [r["paged_seconds"] * 1e3 for r in runs], "paged blocks",
                [r["contiguous_seconds"] * 1e3 for r in runs], "one block per sequence")
    floors = [r.get("kernel_order_read_seconds", 0.0) * 1e3 for r in runs]
    if any(floors):  # the CPU's read of the paged KV in the kernel's order, no arithmetic
        time_ax.scatter([x - 0.2 for x in range(len(names))], floors, color="black", marker="_",
                        s=400, zorder=3, label="read floor (paged, kernel's order)")
    time_ax.set_ylabel("ms per decode call")
    time_ax.set_title("Paged vs contiguous, and the read floor")
    time_ax.legend(fontsize=8)
    for ax in (bw_ax, time_ax):
        ax.set_xlabel("KV dtype")
        ax.grid(True, axis="y", alpha=0.3)
    shape = results.get("shape", {})
    return finish(fig, (f"attention: {shape.get('seqs', '?')} sequences x {shape.get('context', '?')} "
                        f"tokens, backend {shape.get('backend', '?')}"))


def plot_quant(inputs, args):
    path, results = inputs[0]
    runs = results["runs"]
    names = [r["kv_dtype"] for r in runs]
    tokens = results.get("tokens", 0)
    fig, (rate_ax, ratio_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    rate_ax.bar(names, [tokens / r["seconds"] / 1e6 for r in runs], color="C0")
    rate_ax.set_ylabel("million tokens / s")
    rate_ax.set_title("append_kv (quantize on write)")
    paired_bars(ratio_ax, names, [r["ratio_vs_copy_traffic"] for r in runs],
                "(input + stored) vs 2 x copy", [r["ratio_vs_copy_input"] for r in runs],
                "input vs copy")
    ratio_ax.axhline(1, color="black", linewidth=1)
    ratio_ax.set_ylabel("bandwidth / copy bandwidth of the same run")
    ratio_ax.set_title("Against a copy")
    ratio_ax.legend(fontsize=8)
    for ax in (rate_ax, ratio_ax):
        ax.set_xlabel("KV dtype")
        ax.grid(True, axis="y", alpha=0.3)
    return finish(fig, f"quant: {tokens} tokens per call")


def plot_copy(inputs, args):
    path, results = inputs[0]
    runs = results["runs"]
    names = [r["operation"] for r in runs]
    fig, (bw_ax, ratio_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    bw_ax.barh(names, [r["bytes"] / r["seconds"] / 1e9 for r in runs], color="C0")
    bw_ax.set_xlabel("GB/s")
    bw_ax.set_title("Blocks moved per second")
    bars = ratio_ax.barh(names, [r["ratio_vs_bulk_copy"] for r in runs], color="C1")
    ratio_ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ratio_ax.axvline(1, color="black", linewidth=1)
    ratio_ax.set_xlabel("vs one bulk copy of the same bytes, same direction")
    ratio_ax.set_title("Against a bulk copy")
    ratio_ax.set_yticks([])
    for ax in (bw_ax, ratio_ax):
        ax.grid(True, axis="x", alpha=0.3)
    return finish(fig, f"{results['routine']}: scattered block moves")


# --- seed-ops and seed-bench -----------------------------------------------------------------

def plot_seed_ops(inputs, args):
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    labels = [f"live {r['live']}\n{label_of(p)}" for p, r in inputs]
    bars = ax.bar(labels, [r["ops_per_second"] / 1e6 for _, r in inputs],
                  color=[f"C{i}" for i in range(len(inputs))])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_ylabel("million operations / s")
    ax.grid(True, axis="y", alpha=0.3)
    return finish(fig, "seed-ops: the seed op script through kvfabric's PagedKvCache")


def plot_seed_bench(inputs, args):
    rounds = [r for _, results in inputs for r in results["rounds"]]
    lives = sorted({r["live"] for r in rounds})
    fig, (rate_ax, ratio_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    xs = range(len(lives))
    for offset, key, label in ((-0.2, "kvfabric_mops", "kvfabric (C++)"),
                               (0.2, "seed_mops", "seed crate (Rust)")):
        means = [sum(r[key] for r in rounds if r["live"] == live) /
                 len([r for r in rounds if r["live"] == live]) for live in lives]
        rate_ax.bar([x + offset for x in xs], means, 0.4, label=label)
    rate_ax.set_xticks(list(xs), [f"live {live}" for live in lives])
    rate_ax.set_ylabel("million operations / s (mean of rounds)")
    rate_ax.legend(fontsize=8)
    for live in lives:
        ratios = [r["ratio"] for r in rounds if r["live"] == live]
        ratio_ax.plot(range(1, len(ratios) + 1), ratios, "o-", label=f"live {live}")
    ratio_ax.axhline(1, color="black", linewidth=1)
    ratio_ax.set_xlabel("round")
    ratio_ax.set_ylabel("kvfabric / seed")
    ratio_ax.legend(fontsize=8)
    for ax in (rate_ax, ratio_ax):
        ax.grid(True, alpha=0.3)
    return finish(fig, "seed-bench: the same op script, kvfabric vs the seed's Rust PagedKvCache")


# --- compress: attention error and mass kept against budget ------------------------------------

def plot_compress(inputs, args):
    path, results = inputs[0]
    runs = results["runs"]
    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    policies = [p for p in dict.fromkeys(r["policy"] for r in runs) if p != "full"]
    fig, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 7.5), squeeze=False)
    for column, workload in enumerate(workloads):
        error_ax, mass_ax = axes[0][column], axes[1][column]
        for index, policy in enumerate(policies):
            points = sorted((r for r in runs
                             if r["workload"] == workload and r["policy"] == policy),
                            key=lambda r: r["budget"])
            xs = [100 * r["budget"] for r in points]
            error_ax.plot(xs, [r["relative_error"] for r in points], "o-", color=f"C{index}",
                          label=policy)
            mass_ax.plot(xs, [r["mass_kept"] for r in points], "o-", color=f"C{index}",
                         label=policy)
        error_ax.axhline(0, color="black", linestyle="--", linewidth=1, label="full (reference)")
        mass_ax.axhline(1, color="black", linestyle="--", linewidth=1, label="full (reference)")
        error_ax.set_title(f"{workload}: attention output error")
        error_ax.set_ylabel("relative L2 error vs full attention")
        mass_ax.set_title(f"{workload}: attention mass kept")
        mass_ax.set_ylabel("held tokens' share of the full softmax")
        mass_ax.set_ylim(top=1.02)
        for ax in (error_ax, mass_ax):
            ax.set_xlabel("budget (% of the tokens the full cache holds)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    o = results.get("options", {})
    return finish(fig, (f"compress: {o.get('tokens', '?')} prompt tokens + "
                        f"{o.get('decode_steps', '?')} decode steps, {o.get('layers', '?')} layers "
                        f"x {o.get('heads', '?')} heads x {o.get('head_dim', '?')} "
                        f"(synthetic, seed {o.get('seed', '?')})"))


FIGURES = {
    "alloc": plot_alloc,
    "replay": plot_replay,
    "replay-dp": plot_replay_dp,
    "transfer": plot_transfer,
    "attention": plot_attention,
    "quant": plot_quant,
    "copy": plot_copy,
    "seed-ops": plot_seed_ops,
    "seed-bench": plot_seed_bench,
    "compress": plot_compress,
}


def load(paths):
    inputs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                inputs.append((path, json.load(f)))
        except (OSError, ValueError) as error:
            raise CannotPlot(f"{path}: cannot read JSON ({error})") from error
    kinds = {kind_of(path, results) for path, results in inputs}
    if len(kinds) > 1:
        raise CannotPlot(f"these files come from different routines ({', '.join(sorted(kinds))}); "
                         "plot one routine at a time")
    kind = kinds.pop()
    single = {"attention", "quant", "copy", "compress"}
    if kind in single and len(inputs) > 1:
        raise CannotPlot(f"{kind} results are drawn one file at a time")
    return kind, inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="kvfabric-bench --json files")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    parser.add_argument("--reference", action="store_true",
                        help="replay: also draw the reference LRU simulation (performance-anchors.md 1.3)")
    parser.add_argument("--figure", choices=["auto", "scale"], default="auto",
                        help="replay --dp: force the scale figure (admission, hit ratio, memory "
                             "against dp) even for one file")
    args = parser.parse_args()
    kind = "?"
    try:
        kind, inputs = load(args.results)
        fig = FIGURES[kind](inputs, args)
    except CannotPlot as error:
        print(f"plot.py: {error}", file=sys.stderr)
        return CANNOT_PLOT
    except (KeyError, TypeError, IndexError) as error:
        print(f"plot.py: {args.results[0]}: results lack a field the {kind} figure needs ({error!r}); "
              "rerun the routine with this version of kvfabric-bench", file=sys.stderr)
        return CANNOT_PLOT
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
