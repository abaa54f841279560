"""The only module that reads the environment: a few debugging / location switches.

DSV4_HOME   where built-in models are materialised (default ~/.cache/dsv4)
"""

import os
from pathlib import Path


def dsv4_home() -> Path:
    return Path(os.environ.get("DSV4_HOME") or Path.home() / ".cache" / "dsv4")
