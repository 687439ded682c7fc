import os
import shutil
import tempfile

import pytest
import torch

# Tests see the CPU only and stay small: one intra-op thread per process keeps multi-rank gloo
# tests from oversubscribing a 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU the Triton kernels run in Triton's interpreter. It must be chosen before the first
# kernel is jitted in this process, whichever test module happens to get there first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The fitted coefficients (autotune.profile.fits) go to a cache folder of this session's own, not
# the user's ~/.cache: set before any test module imports autotune, inherited by the subprocesses
# the tests start, removed when the session ends. The fits are measured once per session.
COEFFICIENT_CACHE = tempfile.mkdtemp(prefix="autotune-test-cache-")
os.environ["AUTOTUNE_CACHE"] = COEFFICIENT_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(COEFFICIENT_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
