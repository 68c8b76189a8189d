"""The public ForeSight functions of algorithm.md §4, importable from here as before; they live in
`exert_ds.prune.foresight`."""

from exert_ds.prune.foresight import foresight_scores, row_mask

__all__ = ["foresight_scores", "row_mask"]
