#!/usr/bin/python3
"""Plots the block hit ratio of `kvfabric-bench replay` runs against the cache capacity.

Each argument is the --json output of one replay command (one series per file, labelled from its
options); the capacity 0 (unlimited) run is drawn as a dashed line. The reference LRU simulation
of performance-anchors.md section 1.3 is drawn for comparison with --reference.

  build/bin/kvfabric-bench replay --capacity-tokens 1000000,3000000,10000000,50000000,0 \\
      --json build/replay-lru.json
  launch/plot_replay.py build/replay-lru.json -o launch/figures/replay_hit_ratio.png --reference

Uses the system python3 (python3-matplotlib, installed by launch/setup.sh).
"""

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

# performance-anchors.md section 1.3: block-granular LRU simulation of the Mooncake conversation
# trace (prefix-only lookups, 512-token blocks); not measured by this project.
REFERENCE_LRU = {1_000_000: 0.0532, 3_000_000: 0.1355, 10_000_000: 0.2852, 50_000_000: 0.3635}


def series_label(results):
    options = results.get("options", {})
    blocks = "full blocks only" if options.get("full_blocks_only") else "last partial block cached"
    return f"{options.get('policy', '?')}, {blocks}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="kvfabric-bench replay --json files")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    parser.add_argument("--reference", action="store_true",
                        help="also draw the reference LRU simulation (performance-anchors.md 1.3)")
    args = parser.parse_args()

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for index, path in enumerate(args.results):
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        if results.get("routine") != "replay":
            sys.exit(f"{path}: not the output of `kvfabric-bench replay`")
        color = f"C{index}"
        runs = sorted(results["runs"], key=lambda r: r["capacity_tokens"])
        finite = [r for r in runs if r["capacity_tokens"] > 0]
        unlimited = [r for r in runs if r["capacity_tokens"] == 0]
        label = series_label(results)
        if finite:
            xs = [r["capacity_tokens"] for r in finite]
            ys = [r["block_hit_ratio"] for r in finite]
            ax.plot(xs, ys, "o-", color=color, label=label)
        for r in unlimited:
            ax.axhline(r["block_hit_ratio"], color=color, linestyle="--", linewidth=1,
                       label=f"{label}, unlimited: {r['block_hit_ratio']:.4f}")
    if args.reference:
        xs = sorted(REFERENCE_LRU)
        ax.plot(xs, [REFERENCE_LRU[x] for x in xs], "x", color="black", markersize=8,
                label="reference LRU simulation (performance-anchors.md 1.3)")
    ax.set_xscale("log")
    ax.set_xlabel("cache capacity (tokens)")
    ax.set_ylabel("block hit ratio")
    ax.set_ylim(0, 0.45)
    ax.set_title("Mooncake conversation trace through the block-granular prefix cache")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
