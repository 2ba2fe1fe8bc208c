#!/usr/bin/python3
"""ctest driver for kvfabric-bench's progress display and launch/plot.py (label tools).

  tools_test.py progress BENCH                 --quiet silences stderr; without it a progress
                                               line appears; neither changes stdout's figures
                                               nor the JSON's (wall-clock fields aside)
  tools_test.py plot BENCH PLOT CASE WORKDIR [MPIEXEC...]
                                               runs CASE's routine on a small input and draws
                                               it; CASE "unknown" and "config" must fail with 2
"""

import json
import os
import struct
import subprocess
import sys

# Small inputs: each routine's JSON in well under a second.
CASES = {
    "alloc": [["alloc", "--max-requests", "400", "--block-size", "16,64"]],
    "replay": [["replay", "--max-requests", "400", "--capacity-tokens", "1000000,0"]],
    "replay-dp": [["replay", "--dp", "4", "--max-requests", "600", "--time-scale", "6",
                   "--capacity-tokens", "4194304", "--host-capacity-tokens", "1048576"]],
    "scale": [["replay", "--dp", str(dp), "--max-requests", "200", "--routing", "global-migration",
               "--capacity-tokens", str(524288 * dp)] for dp in (2, 4)],
    "attention": [["attention", "--seqs", "2", "--context", "256", "--dtype", "f16,int8",
                   "--iterations", "1"]],
    "quant": [["quant", "--tokens", "1024", "--dtype", "f16,int8", "--iterations", "1"]],
    "copy": [["copy", "--blocks", "64", "--moves", "16", "--iterations", "1"]],
    "seed-ops": [["seed-ops", "--ops", "20000", "--live", "100"]],
    "compress": [["compress", "--tokens", "256", "--heads", "2", "--head-dim", "32",
                  "--decode-steps", "8", "--layers", "2", "--budgets", "0.1,0.3"]],
    # Under mpirun -n 4: the shards' scores reach rank 0 through the plans' reports.
    "compression": [["replay", "--dp", "2", "--tp", "2", "--max-requests", "150",
                     "--routing", "global-migration", "--capacity-tokens", "2000000",
                     "--compression", "none;streaming:ratio=0.5,interval=8;h2o:ratio=0.5,interval=8"]],
    "transfer": [["transfer", "--block-bytes", "16384,1048576", "--blocks", "1,16", "--repeats",
                  "1", "--warmup", "0", "--bytes-per-sample", "1048576"]],
}
# Keys whose values may differ between two identical runs: wall-clock measurements, and the
# coordinator's host memory (container capacities; it varies between two --quiet runs too).
TIMING_MARKERS = ("_us", "seconds", "per_second", "admit_histogram", "coordinator_bytes")


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def run(command, **kwargs):
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items()
                if not any(marker in k for marker in TIMING_MARKERS)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def check_progress(bench, workdir):
    os.makedirs(workdir, exist_ok=True)
    for name, args in (("replay", ["replay", "--max-requests", "300"]),
                       ("replay-dp", ["replay", "--dp", "2", "--max-requests", "150",
                                      "--routing", "global-migration"])):
        quiet_json = os.path.join(workdir, f"{name}-quiet.json")
        shown_json = os.path.join(workdir, f"{name}-shown.json")
        quiet = run([bench, *args, "--quiet", "--json", quiet_json])
        if quiet.returncode != 0:
            fail(f"{name} --quiet exited {quiet.returncode}: {quiet.stderr}")
        if quiet.stderr != "":
            fail(f"{name} --quiet wrote to stderr: {quiet.stderr!r}")
        # A zero interval prints a line at every update: the run is too short for the default.
        shown = run([bench, *args, "--progress-interval", "0", "--json", shown_json])
        if shown.returncode != 0:
            fail(f"{name} exited {shown.returncode}: {shown.stderr}")
        label = "[replay unlimited]" if name == "replay" else "[replay global-migration]"
        lines = shown.stderr.splitlines()
        if not any(line.startswith(label) and "requests/s" in line for line in lines):
            fail(f"{name}: no progress line starting {label!r} in stderr: {shown.stderr!r}")
        if "\r" in shown.stderr:
            fail(f"{name}: a bar was drawn although stderr is not a terminal")
        with open(quiet_json, encoding="utf-8") as f:
            quiet_results = without_timings(json.load(f))
        with open(shown_json, encoding="utf-8") as f:
            shown_results = without_timings(json.load(f))
        if quiet_results != shown_results:
            fail(f"{name}: the JSON differs with and without progress")
        print(f"{name}: quiet stderr empty; {len(lines)} progress lines otherwise; same JSON")


def check_compression(path):
    """Every policy compacted and held less KV per sequence than none; H2O's scores came from
    the ranks."""
    with open(path, encoding="utf-8") as f:
        runs = {r["compression"]: r for r in json.load(f)["runs"]}
    none = runs.pop("none")
    for name, r in runs.items():
        if r["compactions"] == 0 or r["kv_tokens_per_sequence"] >= none["kv_tokens_per_sequence"]:
            fail(f"{name}: {r['compactions']} compactions, {r['kv_tokens_per_sequence']:.0f} KV "
                 f"tokens per sequence (none: {none['kv_tokens_per_sequence']:.0f})")
        if name.startswith("h2o") and r["score_bytes"] == 0:
            fail(f"{name}: the ranks sent no scores")
    print("compression: " + ", ".join(f"{n} {r['kv_tokens_per_sequence']:.0f}" for n, r in runs.items()))


def check_plot(bench, plot, case, workdir, mpiexec):
    os.makedirs(workdir, exist_ok=True)
    png = os.path.join(workdir, f"{case}.png")
    if os.path.exists(png):
        os.remove(png)
    if case in ("unknown", "config"):
        path = os.path.join(workdir, f"{case}.json")
        if case == "unknown":
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"hello": [1, 2, 3]}, f)
        else:
            config = os.path.join(os.path.dirname(__file__), "../../../configs/llama3-8b.yaml")
            made = run([bench, "--quiet", "config", config, "--json", path])
            if made.returncode != 0:
                fail(f"config exited {made.returncode}: {made.stderr}")
        drawn = run([plot, path, "-o", png])
        expected = "not kvfabric-bench --json results" if case == "unknown" else "nothing to plot"
        if drawn.returncode != 2 or expected not in drawn.stderr:
            fail(f"plot.py on {case} JSON: exit {drawn.returncode}, stderr {drawn.stderr!r}; "
                 f"expected exit 2 and {expected!r}")
        if os.path.exists(png):
            fail(f"plot.py wrote {png} for {case} JSON")
        print(f"{case}: exit 2, {drawn.stderr.strip()}")
        return
    jsons = []
    for index, args in enumerate(CASES[case]):
        path = os.path.join(workdir, f"{case}-{index}.json")
        made = run([*mpiexec, bench, "--quiet", *args, "--json", path])
        if made.returncode != 0:
            fail(f"{' '.join(args)} exited {made.returncode}: {made.stdout}\n{made.stderr}")
        jsons.append(path)
    if case == "compression":
        check_compression(jsons[0])
    drawn = run([plot, *jsons, "-o", png])
    if drawn.returncode != 0:
        fail(f"plot.py exited {drawn.returncode}: {drawn.stderr}")
    with open(png, "rb") as f:
        head = f.read(8)
    size = os.path.getsize(png)
    if head != b"\x89PNG\r\n\x1a\n" or size < 10_000:
        fail(f"{png} is not a PNG figure ({size} bytes)")
    print(f"{case}: {png}, {size} bytes")


def check_refusals(bench, workdir):
    """Options and inputs that crashed, hung or read past a buffer are refused by name, quickly
    (each found by an adversarial pass over the tools' inputs)."""
    os.makedirs(workdir, exist_ok=True)
    script = os.path.join(workdir, "bad-header.ops")
    with open(script, "wb") as f:  # announces 2^61 setup ops in a file that holds none
        f.write(b"KVFOPS01" + struct.pack("<4Q", 1000, 16, 2**61, 0))
    cases = (
        (["copy", "--blocks", "4", "--moves", "2", "--iterations", "1", "--threads", "1",
          "--layers", "1"], "at least 3 x moves"),
        (["attention", "--threads", "100000", "--iterations", "1"], "--threads"),
        (["alloc", "--max-requests", "50", "--time-scale", "1e-20"], "past 2^63 steps"),
        (["replay", "--dp", "2", "--max-requests", "10", "--step-ms", "nan"],
         "--step-ms: Value nan is not a finite number"),
        (["--progress-interval", "nan", "alloc", "--max-requests", "5"],
         "--progress-interval: Value nan is not a finite number"),
        (["alloc", "--max-requests", "5", "--watermark", "nan"], "--watermark: Value nan"),
        (["seed-ops", "--run", script], "announces 2305843009213693952 + 0 ops"),
    )
    for args, says in cases:
        refused = run([bench, "--quiet", *args], timeout=60)
        if refused.returncode == 0 or refused.returncode < 0 or says not in refused.stderr:
            fail(f"{' '.join(args)}: exit {refused.returncode}, stderr {refused.stderr!r}; "
                 f"expected a refusal saying {says!r}")
        print(f"{args[0]}: refused ({says})")
    # An unwritable --json is refused before the routine runs (it was found only at the end).
    for target, says in ((os.path.join(workdir, "no-such-dir", "r.json"), "its folder"),
                         (workdir, "it is a directory")):
        early = run([bench, "--quiet", "--json", target, "alloc", "--max-requests", "5"],
                    timeout=60)
        if early.returncode != 1 or says not in early.stderr or early.stdout:
            fail(f"--json {target}: exit {early.returncode}, stdout {early.stdout!r}, stderr "
                 f"{early.stderr!r}: expected a refusal saying {says!r} before the run")
    print("--json: an unwritable path is refused before the run")
    # Regression: with --dp 1 the single-process replay ran and ignored the options of the
    # replay across replicas (under mpirun, once per rank).
    across = run([bench, "--quiet", "replay", "--dp", "1", "--routing", "global-migration",
                  "--max-requests", "50"], timeout=120)
    if across.returncode != 0 or "global-migration" not in across.stdout:
        fail(f"replay --dp 1 --routing global-migration: exit {across.returncode}, stdout "
             f"{across.stdout!r}: expected the replay across replicas")
    print("replay --dp 1 with --routing: the replay across replicas")


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "refusals":
        check_refusals(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "tools_test_refusals")
    elif len(sys.argv) >= 3 and sys.argv[1] == "progress":
        check_progress(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "tools_test_progress")
    elif len(sys.argv) >= 6 and sys.argv[1] == "plot":
        check_plot(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
