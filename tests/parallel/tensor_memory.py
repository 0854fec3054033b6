"""Peak live tensor bytes on CPU, from the profiler's allocation events (shared by the memory tests).

`torch.profiler.profile(profile_memory=True)` makes the CPU allocator report every allocation and
free with its running total of bytes allocated since profiling began (`total_allocated`, read from
the profiler's event tree). The peak of that total inside a `record_function(WINDOW)` range, less
its value before profiling, is the peak of live tensor storage (parameters, gradients, optimizer
state, saved activations, kernel temporaries) -- not RSS, which also counts the Python heap,
libraries and allocator caches. tests/parallel/test_planner.py's
`test_measure_counts_live_tensor_bytes` pins this behaviour of the (private) event-tree API.
"""

from __future__ import annotations

from torch._C._profiler import _EventType

WINDOW = "plait.measured_window"


def peak_in_window(prof, window: str = WINDOW) -> int:
    """Peak of the allocator's running total inside the `window` range, relative to before profiling."""
    allocs, windows = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            allocs.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
        elif event.name == window:
            windows.append((event.start_time_ns, event.end_time_ns))
        stack.extend(event.children)
    allocs.sort()
    (start, end), = windows
    before = allocs[0][1] - allocs[0][2]  # what earlier profiling in this process left counted
    return max(total for t, total, _ in allocs if start <= t <= end) - before
