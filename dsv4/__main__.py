"""`python -m dsv4 ...`: the same as the `dsv4` command."""

import sys

from dsv4.cli import main

sys.exit(main())
