"""Which allocations hold the accelerator's memory at the peak of one call (issue 8: the prune event's peak grows
with the number of blocks).

`torch.cuda.memory._record_memory_history` records every allocation and free of the caching allocator with its
Python stack while the call runs. The trace is replayed twice: once to find the moment of the highest allocated
memory (frees counted when requested, as torch's allocated-bytes statistic counts them), once to group the
allocations live at that moment by where they were made. Frees that were requested but not completed (memory held
for another stream's pending work) are tallied separately: they hold memory that torch's statistic no longer counts.
CUDA only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

GIB = 2**30
OUR_CODE = ("exert_ds/", "eval/")


def _short(frame: dict[str, Any]) -> str:
    """`exert_ds/<package>/<module>.py:LINE name` for our code, the last two path parts for the rest."""
    name = frame["filename"]
    path = "exert_ds/" + name.rsplit("exert_ds/", 1)[1] if "exert_ds/" in name else "/".join(name.split("/")[-2:])
    return f"{path}:{frame['line']} {frame['name']}"


def allocation_site(frames: list[dict[str, Any]]) -> str:
    """The innermost Python frame, and the innermost frame of our own code that led to it (frames run innermost
    first in torch's snapshots)."""
    if not frames:
        return "(no Python frame)"
    ours = next((f for f in frames if any(part in f["filename"] for part in OUR_CODE)), None)
    inner = _short(frames[0])
    return inner if ours is None or ours is frames[0] else f"{inner} <- {_short(ours)}"


def _replay(trace: list[dict[str, Any]], stop: int | None) -> tuple[int, int, dict[int, tuple[int, str]], int]:
    """Walk the trace (up to entry `stop`): (index of the peak, allocated bytes above the start at the peak, live
    allocations made during the trace at `stop`, bytes requested free but not yet completed at `stop`)."""
    live: dict[int, tuple[int, str]] = {}
    pending: dict[int, int] = {}
    current = peak = peak_at = 0
    for index, entry in enumerate(trace[: None if stop is None else stop + 1]):
        action, addr, size = entry["action"], entry["addr"], entry["size"]
        if action == "alloc":
            live[addr] = (size, allocation_site(entry.get("frames", [])))
            current += size
        elif action == "free_requested":
            live.pop(addr, None)
            pending[addr] = size
            current -= size  # also for memory allocated before the trace began
        elif action == "free_completed":
            pending.pop(addr, None)
        if current > peak:
            peak, peak_at = current, index
    return peak_at, peak, live, sum(pending.values())


def traced_peak(fn: Callable[[], Any], top: int = 12, max_entries: int = 1_000_000) -> dict[str, Any]:
    """Run `fn` with the allocator's history recorded; the peak's allocated GiB and its largest allocation sites."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    try:
        fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    peak_at, peak, _, pending_at_end = _replay(trace, None)
    _, _, live, pending = _replay(trace, peak_at)
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, site in live.values():
        sites[site][0] += size
        sites[site][1] += 1
    ranked = sorted(sites.items(), key=lambda item: -item[1][0])[:top]
    return {
        "trace_entries": len(trace),
        "trace_full": len(trace) >= max_entries,
        "allocated_at_start_gib": start / GIB,
        "peak_allocated_gib": (start + peak) / GIB,
        "allocated_at_end_gib": torch.cuda.memory_allocated() / GIB,
        "peak_trace_fraction": peak_at / max(1, len(trace)),
        "live_at_peak_from_this_call_gib": sum(size for size, _ in live.values()) / GIB,
        "freed_but_pending_at_peak_gib": pending / GIB,
        "freed_but_pending_at_end_gib": pending_at_end / GIB,
        "top_sites_at_peak": [{"site": site, "gib": size / GIB, "count": count} for site, (size, count) in ranked],
    }
