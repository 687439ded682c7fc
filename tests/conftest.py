import os

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
