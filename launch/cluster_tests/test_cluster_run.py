"""A real 4-rank job through launch/cluster on this machine's CPU: kvfabric-bench replay of a
dp 2 x tp 2 config under mpirun, then the run folder it leaves."""

import json
import shutil

import pytest

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
