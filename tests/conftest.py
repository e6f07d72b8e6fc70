"""Test-session setup.

The crash-safety tests ``os.fork`` the test process mid-training (tests/test_reliability_crash.py). A child forked
from a process whose OpenMP thread pool is running deadlocks in its first parallel torch op (GNU libgomp is not
fork-safe), so the test process uses one intra-op thread: set before torch is first imported, here.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
