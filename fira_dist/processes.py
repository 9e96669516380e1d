"""Process helpers every multi-rank entry point shares (the trainer, the memory measurement worker, tests).

Below both ``fira_dist.pretrain`` and ``fira_dist.memory``: neither imports the other for these.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys


def destroy() -> None:
    """Destroy the default process group, if there is one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_without_finalization(code: int) -> None:
    """Flush logs and standard streams and leave with ``os._exit(code)``, skipping interpreter finalization.

    After ``destroy_process_group`` a gloo rank can still die at exit with "terminate called without an
    active exception" (SIGABRT, a teardown race between gloo's threads and finalization; seen about once in
    a few hundred CI runs of 2-rank jobs, after all work and the final checkpoint were done; pytorch/pytorch
    #179291). The launcher then reports a failed job, so a finished rank leaves without finalization."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
