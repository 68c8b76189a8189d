"""The pruning: ForeSight, PBS and SparseGPT math, calibration statistics, the prune event and its schedule."""
