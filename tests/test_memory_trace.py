"""eval/memory_trace.py's replay of an allocator trace, on a hand-written trace in torch's snapshot format, against
the peak and live set worked out by hand (the recording itself needs CUDA and runs in eval/bench_scale.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

from memory_trace import _replay, allocation_site  # noqa: E402

HESSIAN = [
    {"filename": "/x/exert_ds/prune/calibration.py", "line": 98, "name": "gram"},
    {"filename": "/x/exert_ds/prune/calibration.py", "line": 120, "name": "accumulate"},
]
PBS = [
    {"filename": "/site/torch/functional.py", "line": 5, "name": "solve"},
    {"filename": "/x/exert_ds/prune/pbs.py", "line": 90, "name": "partial_brain_surgeon_with_errors"},
]


def entry(action: str, addr: int, size: int, frames=None) -> dict:
    return {"action": action, "addr": addr, "size": size, "frames": frames or []}


def test_allocation_site_names_the_innermost_frame_and_our_code_that_led_to_it():
    assert allocation_site(HESSIAN) == "exert_ds/prune/calibration.py:98 gram"
    assert allocation_site(PBS) == "torch/functional.py:5 solve <- exert_ds/prune/pbs.py:90 partial_brain_surgeon_with_errors"
    assert allocation_site([]) == "(no Python frame)"


def test_replay_finds_the_peak_and_what_is_live_there():
    trace = [
        entry("alloc", 1, 100, HESSIAN),  # +100 → 100
        entry("alloc", 2, 50, PBS),  # +50 → 150
        entry("free_requested", 9, 30),  # memory from before the trace: 120
        entry("alloc", 3, 60, PBS),  # 180: the peak (index 3)
        entry("free_requested", 2, 50),  # 130, pending until completed
        entry("free_requested", 3, 60),  # 70
        entry("free_completed", 3, 60),
        entry("alloc", 4, 40, HESSIAN),  # 110
    ]
    peak_at, peak, _, _ = _replay(trace, None)
    assert (peak_at, peak) == (3, 180)
    _, _, live, pending = _replay(trace, peak_at)
    assert live == {1: (100, allocation_site(HESSIAN)), 2: (50, allocation_site(PBS)), 3: (60, allocation_site(PBS))}
    assert pending == 30  # the pre-trace block, requested free and never completed
    _, _, live_end, pending_end = _replay(trace, len(trace) - 1)
    assert set(live_end) == {1, 4}
    assert pending_end == 30 + 50
