"""The only module that reads or sets the environment: a few debugging / location switches, and one
library default that must be in place before torch loads OpenMP.

DSV4_HOME   where built-in models are materialised (default ~/.cache/dsv4)
"""

import os
from pathlib import Path

# OpenMP threads that spin while waiting make small CPU ops 30-400x slower as soon as another process
# shares the cores (measured: a tiny-model decode step took 3.3 s instead of 0.3 s on a busy 2-core
# machine). Passive waiting costs nothing measurable when the machine is idle. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def dsv4_home() -> Path:
    return Path(os.environ.get("DSV4_HOME") or Path.home() / ".cache" / "dsv4")
