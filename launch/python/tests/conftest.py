"""Shared fixtures: where the build is, a small config, and a live kvfabric-serve.

Run from launch/test, or by hand (see launch/python/README.md):
    PYTHONPATH=build/python python3 -m pytest launch/python/tests
KVF_BUILD_DIR (default <repo>/build) names the build whose bin/kvfabric-serve the client tests
start.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BUILD = Path(os.environ.get("KVF_BUILD_DIR", REPO / "build"))

TINY_YAML = """\
model: {name: py-tiny, num_layers: 2, num_query_heads: 4, num_kv_heads: 2, head_dim: 16, dtype: f32}
cache: {block_size: 16, num_blocks: 64, host_num_blocks: 16, kv_dtype: f32}
topology: {tp: 1, dp: 1}
"""


@pytest.fixture
def tiny_yaml() -> str:
    return TINY_YAML


def serve_binary() -> Path:
    path = Path(os.environ.get("KVF_SERVE", BUILD / "bin" / "kvfabric-serve"))
    if not path.exists():
        pytest.fail(f"{path} does not exist: build kvfabric-serve (ninja -C build kvfabric-serve) "
                    "or set KVF_SERVE / KVF_BUILD_DIR")
    return path


class Server:
    """A kvfabric-serve process (coordinator only: no mpirun) on a free port."""

    def __init__(self, tmp: Path, yaml: str, startup_timeout: float = 20.0) -> None:
        config = tmp / "serve.yaml"
        config.write_text(yaml)
        self.process = subprocess.Popen(
            [str(serve_binary()), "--config", str(config), "--port", "0", "--allow-shutdown"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = ""
        # The first line says where it listens: "kvfabric-serve: control plane on ADDR:PORT (...".
        deadline = time.monotonic() + startup_timeout
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=deadline - time.monotonic()):
                break
            line = self.process.stdout.readline()
            if not line:
                break
            self.output += line
            found = re.search(r"control plane on ([0-9.]+):(\d+)", line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                return
        self.process.kill()
        raise RuntimeError(f"kvfabric-serve did not start: {self.output}")

    def wait(self, timeout: float = 10.0) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


@pytest.fixture
def start_server(tmp_path):
    """start_server(yaml) -> a running Server; every one is stopped after the test."""
    servers = []

    def start(yaml: str = TINY_YAML) -> Server:
        servers.append(Server(tmp_path, yaml))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server) -> Server:
    return start_server()
