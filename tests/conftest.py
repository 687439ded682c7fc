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


def shared_launch(request, tmp_path_factory, nproc: int, fixture: str, spec: str) -> dict:
    """One torchrun launch of `nproc` gloo ranks (tests/tp_pp_worker.py) that runs the `spec(root)`
    of every test module whose selected tests take `fixture`: the ranks' start-up, an interpreter
    each importing torch and the engine on a 2-core machine, paid once. {"root": the folder holding
    a folder per module, named as the module, "out": the worker's OUT}."""
    from tp_pp_worker import launch, merged

    root = tmp_path_factory.mktemp(fixture)
    modules = {item.module for item in request.session.items if fixture in getattr(item, "fixturenames", ())}
    specs = [getattr(m, spec)(root / m.__name__) for m in sorted(modules, key=lambda m: m.__name__)]
    return {"root": root, "out": launch(root, fixture, merged(specs), nproc=nproc)}


@pytest.fixture(scope="session")
def two_rank_run(request, tmp_path_factory) -> dict:
    """The modules' `two_rank_spec` on 2 ranks (test_context_parallel.py, test_engine_parallel.py,
    test_float8_tp.py, test_reduce_dtype.py, test_tp_kernels.py): shared_launch."""
    return shared_launch(request, tmp_path_factory, 2, "two_rank_run", "two_rank_spec")


@pytest.fixture(scope="session")
def four_rank_run(request, tmp_path_factory) -> dict:
    """The modules' `four_rank_spec` on 4 ranks (test_tp_pp.py, test_moe.py, test_async_tp.py,
    test_context_parallel.py, test_estimate_moe.py): shared_launch."""
    return shared_launch(request, tmp_path_factory, 4, "four_rank_run", "four_rank_spec")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
