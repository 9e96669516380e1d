"""Shared by every test file: each test leaves ``os.environ`` as it found it.

The trainer run in-process (``fira_dist.pretrain.main.main``) exports its rank, world size and master address into
``os.environ`` (what ``env://`` and DeepSpeed read); left there, they reach later tests' subprocesses, e.g. a job
submitted to the test Slurm cluster, whose tasks then each believed they were the only rank."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environ():
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
