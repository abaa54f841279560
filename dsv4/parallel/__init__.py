"""Multi-device execution (design: issue 8): expert parallelism with data-parallel attention."""

from dsv4.parallel.ep import ExpertParallel  # noqa: F401
