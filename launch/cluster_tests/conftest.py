"""Shared fixtures of launch/cluster's tests: the launcher, the binaries and a dp 2 x tp 2 config.

KVF_BIN_DIR (default <repo>/build/bin) names the folder of kvfabric-serve and kvfabric-bench;
the launcher reads the config's topology with that kvfabric-bench. ctest runs these files
(tests/CMakeLists.txt includes launch/cluster_tests/cluster.cmake); by hand:
    python3 -m pytest -q -p no:cacheprovider launch/cluster_tests
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "launch" / "cluster"
BIN_DIR = Path(os.environ.get("KVF_BIN_DIR") or REPO / "build" / "bin")
# Variables the launcher forwards or refuses on; the tests set them themselves.
CONTROLLED_PREFIXES = ("NCCL_", "KVF_", "UCX_", "CUDA_VISIBLE_DEVICES", "OMPI_")


@pytest.fixture
def config(tmp_path):
    """configs/tiny-cpu-dp2.yaml with tp 2: a dp 2 x tp 2 job, 4 ranks."""
    text = (REPO / "configs" / "tiny-cpu-dp2.yaml").read_text()
    assert "  tp: 1\n" in text
    path = tmp_path / "dp2-tp2.yaml"
    path.write_text(text.replace("  tp: 1\n", "  tp: 2\n"))
    return path


@pytest.fixture
def cluster(tmp_path):
    """Runs launch/cluster in tmp_path (runs/ lands there) with only the variables given."""
    def run(*args, env=None, path=None):
        environ = {name: value for name, value in os.environ.items()
                   if not name.startswith(CONTROLLED_PREFIXES)}
        environ.update(env or {})
        if path is not None:
            environ["PATH"] = path
        return subprocess.run([sys.executable, str(CLUSTER), "--bin", str(BIN_DIR), *args],
                              cwd=tmp_path, env=environ, capture_output=True, text=True,
                              timeout=120)
    return run
