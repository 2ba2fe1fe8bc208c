#!/usr/bin/python3
"""Kept for old command lines: launch/plot.py draws every kvfabric-bench figure.

  launch/plot_scale.py build/scale/dp*.json -o launch/figures/coordinator_scale.png
is the same as
  launch/plot.py build/scale/dp*.json --figure scale -o launch/figures/coordinator_scale.png
"""

import os
import sys

plot = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py")
os.execv(sys.executable, [sys.executable, plot, "--figure", "scale", *sys.argv[1:]])
