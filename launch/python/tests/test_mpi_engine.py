"""The Python TP engine (tp_engine.py) on 2 MPI ranks: every attention output of every step
matches the float64 NumPy reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_tp_engine_on_two_ranks():
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun is missing (Debian: openmpi-bin)"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    engine = Path(__file__).with_name("tp_engine.py")
    run = subprocess.run([mpirun, "-n", "2", "--oversubscribe", sys.executable, str(engine)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tp engine: 9 steps on 2 ranks" in run.stdout and "FAILED" not in run.stdout
