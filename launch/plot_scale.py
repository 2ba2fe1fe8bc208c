#!/usr/bin/python3
"""Plots the coordinator's cost against the number of replicas (launch/scale-study).

Each argument is the --json output of one `kvfabric-bench replay --dp N` run; the figure has three
panels against dp: admission time (mean and p99, with the memcpy of the matched prompt tokens
measured in the same run), the hit ratio, and the coordinator's host memory.

  launch/plot_scale.py build/scale/dp*.json -o launch/figures/coordinator_scale.png

Uses the system python3 (python3-matplotlib, installed by launch/setup.sh).
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402


def load(paths):
    points = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        run = next(r for r in results["runs"] if r["routing"] == "global-migration")
        points.append((results["dp"], run))
    return sorted(points, key=lambda p: p[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="kvfabric-bench replay --dp N --json files")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    args = parser.parse_args()
    points = load(args.results)
    dp = [p[0] for p in points]
    runs = [p[1] for p in points]

    fig, (time_ax, hit_ax, mem_ax) = plt.subplots(1, 3, figsize=(15, 4.5))
    time_ax.plot(dp, [r["admit_mean_us"] for r in runs], "o-", label="admission, mean")
    time_ax.plot(dp, [r["admit_p99_us"] for r in runs], "s--", label="admission, p99")
    time_ax.plot(dp, [r["matched_memcpy_us"] for r in runs], "^:",
                 label="memcpy of the matched prompt tokens")
    time_ax.set_ylabel("µs per admission")
    time_ax.set_title("Coordinator admission")
    hit_ax.plot(dp, [r["hit_ratio"] for r in runs], "o-")
    hit_ax.set_ylabel("prompt tokens served from cache")
    hit_ax.set_ylim(0, 1)
    hit_ax.set_title("Hit ratio (load per replica constant)")
    mem_ax.plot(dp, [r["coordinator_bytes"] / 2**20 for r in runs], "o-")
    mem_ax.set_ylabel("MiB")
    mem_ax.set_title("Coordinator host memory")
    for ax in (time_ax, hit_ax, mem_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("replicas (dp)")
        ax.grid(True, alpha=0.3)
    time_ax.legend(fontsize=8)
    fig.suptitle("Mooncake conversation trace scaled out to dp/4 copies, 512 Ki tokens per replica")
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    for d, r in points:
        print(f"dp {d:5d}: {r['requests']} requests, admission {r['admit_mean_us']:.2f} µs mean "
              f"({r['admissions_per_second'] / 1e3:.0f} k admissions/s), p99 {r['admit_p99_us']:.1f}, "
              f"memcpy {r['matched_memcpy_us']:.2f} µs, hit ratio {r['hit_ratio']:.4f}, "
              f"coordinator {r['coordinator_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
