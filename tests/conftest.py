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


@pytest.fixture(scope="session")
def four_rank_run(request, tmp_path_factory) -> dict:
    """One torchrun launch of 4 gloo ranks (tests/tp_pp_worker.py) that runs the `four_rank_spec(root)`
    of every test module whose selected tests take this fixture (test_tp_pp.py, test_moe.py,
    test_async_tp.py, test_context_parallel.py): the ranks' start-up, an interpreter each importing
    torch and the engine on a 2-core machine, paid once. {"root": the folder holding a folder per
    module, named as the module, "out": the worker's OUT}."""
    from tp_pp_worker import launch, merged

    root = tmp_path_factory.mktemp("four_ranks")
    modules = {item.module for item in request.session.items if "four_rank_run" in getattr(item, "fixturenames", ())}
    specs = [m.four_rank_spec(root / m.__name__) for m in sorted(modules, key=lambda m: m.__name__)]
    return {"root": root, "out": launch(root, "four-ranks", merged(specs), nproc=4)}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
