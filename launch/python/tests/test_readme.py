"""Runs every ```python block of launch/python/README.md, in order, in one namespace (as a
reader would, one after the other), with `port` set to a live kvfabric-serve."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_python_example_in_the_readme_runs(server):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace = {"port": server.port, "__name__": "readme"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{README.name}, python block {i + 1}", "exec"), namespace)
