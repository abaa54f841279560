"""Leaving a process group. With NCCL collectives captured in device graphs, destroying the group (and the
interpreter's own exit) was seen to hang (torch 2.11, 2 x H200): GPU ranks skip it and leave through
`hard_exit_if_needed`, which the CLI calls last."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

_hard_exit = False


def teardown() -> None:
    """End this process's part in the process group (rank 0's DPEngine.shutdown, a worker rank's exit)."""
    global _hard_exit
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        dist.destroy_process_group()
    else:
        _hard_exit = True


def hard_exit_if_needed(rc: int) -> None:
    """Called last by a process that ran a GPU expert-parallel engine: flush and leave now."""
    if _hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
