"""The bytes the CPU allocator holds while a step runs, from torch's profiler: every allocation and
free in order, so temporaries inside an op's own implementation (DTensor's handlers, inductor's
kernels) count too."""
from torch.profiler import ProfilerActivity, profile


def allocation_peak(step) -> tuple[int, int]:
    """Run `step` and return the peak and the final change of the bytes the CPU allocator holds."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live
