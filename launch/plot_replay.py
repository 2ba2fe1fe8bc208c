#!/usr/bin/python3
"""Kept for old command lines: launch/plot.py draws every kvfabric-bench figure.

  launch/plot_replay.py build/replay-lru.json --reference -o launch/figures/replay_hit_ratio.png
is the same as
  launch/plot.py build/replay-lru.json --reference -o launch/figures/replay_hit_ratio.png
"""

import os
import sys

plot = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py")
os.execv(sys.executable, [sys.executable, plot, *sys.argv[1:]])
