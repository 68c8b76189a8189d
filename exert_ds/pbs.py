"""The public Partial Brain Surgeon functions of algorithm.md §4, importable from here as before; they live in
`exert_ds.prune.pbs`."""

from exert_ds.prune.pbs import partial_brain_surgeon, partial_brain_surgeon_reference

__all__ = ["partial_brain_surgeon", "partial_brain_surgeon_reference"]
