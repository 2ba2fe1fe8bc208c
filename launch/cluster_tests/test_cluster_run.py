"""A real 4-rank job through launch/cluster on this machine's CPU: kvfabric-bench replay of a
dp 2 x tp 2 config under mpirun, then the run folder it leaves."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN_DIR, REPO

pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun")

# The consent Open MPI needs from root; a user running the launcher as root exports it.
ROOT_CONSENT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def test_replay_on_four_local_ranks_fills_the_run_folder(cluster, config, tmp_path):
    result = cluster("--hosts", "localhost:4", "--config", str(config), "--name", "dp2-tp2",
                     "--mpirun-arg=--oversubscribe", "--", "replay", "--max-requests", "40",
                     "--routing", "independent", env=ROOT_CONSENT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run_dir = tmp_path / "runs" / "dp2-tp2"
    summary = result.stdout.splitlines()[-1]
    assert summary.startswith("cluster: replay on 4 ranks (localhost: 4), exit 0, ")
    assert f"run folder {run_dir}" in summary
    assert "[1,0]<stdout>:replay across replicas: 40 requests" in result.stdout  # --tag-output

    assert "topology:\n  tp: 2\n  dp: 2\n" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "command.txt").read_text().startswith("mpirun -n 4 --host localhost:4 ")
    rank_dirs = sorted((run_dir / "ranks").glob("*/rank.*"))
    assert [path.name for path in rank_dirs] == ["rank.0", "rank.1", "rank.2", "rank.3"]
    assert all((path / "stdout").is_file() for path in rank_dirs)
    assert "replay across replicas" in (rank_dirs[0] / "stdout").read_text()

    results = json.loads((run_dir / "results.json").read_text())
    assert results["routine"] == "replay"
    assert (results["mpi_ranks"], results["dp"], results["tp"]) == (4, 2, 2)
    assert [run["routing"] for run in results["runs"]] == ["independent"]
    assert results["runs"][0]["requests"] == 40

    text = (run_dir / "summary.txt").read_text()
    assert text.startswith(summary.split("; figure")[0])
    assert "rank logs: ranks/1/rank.0, ranks/1/rank.1, ranks/1/rank.2, ranks/1/rank.3" in text
    # The figure when matplotlib is there, else a note saying why not.
    assert (run_dir / "replay.png").is_file() or "figure skipped: " in text
    # Every rank of this GPU-less machine is placed on the CPU backend and the MPI transport.
    assert results["rank_placements"] == ["cpu backend, mpi transport"] * 4


def test_serve_dry_run_names_every_ranks_placement_and_serves_nothing(cluster, config, tmp_path):
    result = cluster("--hosts", "localhost:4", "--config", str(config), "--name", "dry",
                     "--mpirun-arg=--oversubscribe", "--", "serve", "--dry-run", env=ROOT_CONSENT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "# kvfabric-serve --dry-run: the effective config" in out
    assert "  backend: auto\n" in out.replace("[1,0]<stdout>:", "")
    for rank in range(4):
        assert (f"# rank {rank} on ") in out
        assert (f": replica {rank // 2}, shard {rank % 2}, cpu backend, mpi transport") in out
    assert "# dry run: nothing served" in out
    assert "control plane on" not in out


def test_serve_dry_run_refuses_what_serving_would(tmp_path):
    # Regression: a dry run exited 0 with a tenants or TLS file that serving cannot read.
    base = (REPO / "configs" / "tiny-cpu-dp2.yaml").read_text()
    for extra, says in (("  tenants_file: /nonexistent/tenants.yaml\n",
                         "cannot open tenants file '/nonexistent/tenants.yaml'"),
                        ("  tls_cert_file: /nonexistent/cert.pem\n  tls_key_file: /nonexistent/key.pem\n",
                         "server.tls_cert_file: cannot read '/nonexistent/cert.pem'")):
        config = tmp_path / "bad.yaml"
        config.write_text(base.replace("server:\n", "server:\n" + extra, 1))
        assert "server:\n" + extra in config.read_text()
        result = subprocess.run([str(BIN_DIR / "kvfabric-serve"), "--config", str(config),
                                 "--dry-run"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert says in result.stderr and "nothing served" not in result.stdout


MPIRUN = ["mpirun", "--oversubscribe"]


def serve_ranks(config, *per_rank_env, timeout=120):
    """kvfabric-serve on one rank per entry of per_rank_env (MPMD: each its own variables)."""
    command = list(MPIRUN)
    for i, env in enumerate(per_rank_env):
        if i:
            command.append(":")
        command += ["-n", "1"]
        for name, value in env.items():
            command += ["-x", f"{name}={value}"]
        command += [str(BIN_DIR / "kvfabric-serve"), "--config", str(config), "--dry-run"]
    return subprocess.run(command, env={**os.environ, **ROOT_CONSENT}, capture_output=True,
                          text=True, timeout=timeout)


def test_a_rank_that_cannot_have_its_backend_fails_every_rank(tmp_path):
    config = tmp_path / "dp2.yaml"
    config.write_text((REPO / "configs" / "tiny-cpu-dp2.yaml").read_text())
    result = serve_ranks(config, {"KVF_RUNTIME_BACKEND": "cpu"}, {"KVF_RUNTIME_BACKEND": "cuda"})
    assert result.returncode != 0
    err = result.stderr
    # Rank 1 says why (no device, or a build without CUDA); rank 0 names rank 1 instead of
    # waiting for it.
    assert re.search(r"rank 1 on \S+: runtime.backend cuda, but ", err), err
    assert re.search(r"rank 0 on \S+: the job cannot start: rank\(s\) 1 could not place "
                     r"themselves", err), err


def test_a_rank_whose_config_gives_another_rank_count_fails_every_rank(tmp_path):
    config = tmp_path / "dp2.yaml"
    config.write_text((REPO / "configs" / "tiny-cpu-dp2.yaml").read_text())
    # Rank 1 alone sees dp 1: it used to return before the placement agreement, so rank 0 waited
    # in it and rank 1 in MPI_Finalize, both for ever and without a message.
    result = serve_ranks(config, {}, {"KVF_TOPOLOGY_DP": "1"}, timeout=60)
    assert result.returncode != 0
    err = result.stderr
    assert re.search(r"rank 1 on \S+: dp 1 x tp 1 needs 1 MPI ranks, this job has 2", err), err
    assert re.search(r"rank 0 on \S+: the job cannot start: rank\(s\) 1 could not place", err), err


def test_a_replay_rank_that_cannot_start_ends_the_job_at_once_naming_itself(tmp_path):
    config = tmp_path / "dp2.yaml"
    config.write_text((REPO / "configs" / "tiny-cpu-dp2.yaml").read_text())
    replay = [str(BIN_DIR / "kvfabric-bench"), "replay", "--config", str(config), "--dp", "2",
              "--tp", "1", "--max-requests", "20", "--routing", "independent"]
    # Rank 1 alone asks for arenas far beyond this host's memory.
    command = MPIRUN + ["-n", "1", *replay, ":", "-n", "1", "-x", "KVF_MODEL_NUM_LAYERS=4096",
                        *replay]
    started = time.monotonic()
    result = subprocess.run(command, env={**os.environ, **ROOT_CONSENT}, capture_output=True,
                            text=True, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode != 0
    assert re.search(r"kvfabric-bench: rank 1 on \S+: ResourceExhausted: ", result.stderr), \
        result.stderr
    # Not after rank 0's transport deadline (runtime.plan_deadline_ms, 30 s).
    assert seconds < 20, seconds


def test_replay_without_a_config_still_takes_the_runtime_from_the_environment():
    # The built-in model (no --config): KVF_RUNTIME_BACKEND=cuda must not be passed over.
    command = MPIRUN + ["-n", "2", "-x", "KVF_RUNTIME_BACKEND=cuda", "-x",
                        "KVF_RUNTIME_TRANSPORT=mpi", str(BIN_DIR / "kvfabric-bench"), "replay",
                        "--dp", "2", "--tp", "1", "--max-requests", "10", "--routing",
                        "independent"]
    result = subprocess.run(command, env={**os.environ, **ROOT_CONSENT}, capture_output=True,
                            text=True, timeout=120)
    if result.returncode == 0:  # a GPU machine: the ranks are on it
        assert "(rank 0: cuda backend on device" in result.stdout, result.stdout
    else:  # no GPU or no CUDA: refused by name, not run on the CPU
        assert re.search(r"rank \d on \S+: runtime.backend cuda, but ", result.stderr), \
            result.stdout + result.stderr


def test_ranks_agree_on_what_their_settings_resolve_to_not_on_the_settings(tmp_path):
    if "cpu backend, mpi transport" not in serve_ranks_alone(tmp_path):
        pytest.skip("this machine's ranks do not land on the CPU")
    config = tmp_path / "dp2.yaml"
    config.write_text((REPO / "configs" / "tiny-cpu-dp2.yaml").read_text())
    # auto resolves to MPI on a CPU rank: the same transport as the other's explicit mpi.
    result = serve_ranks(config, {"KVF_RUNTIME_TRANSPORT": "mpi"}, {"KVF_RUNTIME_TRANSPORT": "auto"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("cpu backend, mpi transport") == 2


def serve_ranks_alone(tmp_path):
    config = tmp_path / "alone.yaml"
    config.write_text((REPO / "configs" / "tiny-cpu-dp2.yaml").read_text())
    result = subprocess.run([str(BIN_DIR / "kvfabric-serve"), "--config", str(config), "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_sigterm_to_the_launcher_ends_the_job_and_records_it(tmp_path, config):
    # A stand-in kvfabric-serve that records its pid and waits; the real kvfabric-bench reads the
    # config.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kvfabric-bench").symlink_to(BIN_DIR / "kvfabric-bench")
    pids = tmp_path / "pids"
    pids.mkdir()
    (bin_dir / "kvfabric-serve").write_text(f'#!/bin/sh\necho $$ > {pids}/$$\nexec sleep 300\n')
    (bin_dir / "kvfabric-serve").chmod(0o755)
    environ = {name: value for name, value in os.environ.items()
               if not name.startswith(("KVF_", "NCCL_", "OMPI_", "UCX_"))}
    out_path = tmp_path / "launcher.out"
    with open(out_path, "w") as out:
        launcher = subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "cluster"), "--bin", str(bin_dir), "--hosts",
             "localhost:4", "--config", str(config), "--name", "term",
             "--mpirun-arg=--oversubscribe", "--", "serve"],
            cwd=tmp_path, env={**environ, **ROOT_CONSENT}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(pids.iterdir())) == 4
        launcher.send_signal(signal.SIGTERM)  # a scheduler or `timeout`: to the launcher alone
        assert launcher.wait(timeout=60) != 0
        # mpirun was told: the ranks end (rather than run on without the launcher) ...
        deadline = time.monotonic() + 20
        while any(running(path.name) for path in pids.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(path.name) for path in pids.iterdir()), "the ranks still run"
    finally:
        launcher.kill()
        for path in pids.iterdir():
            if running(path.name):
                os.kill(int(path.name), signal.SIGKILL)
    # ... and the summary says how the job ended.
    text = out_path.read_text()
    assert "cluster: serve on 4 ranks (localhost: 4), exit " in text, text
    assert (tmp_path / "runs" / "term" / "summary.txt").is_file()


def running(pid):
    """Whether the process runs (a zombie no longer does)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
