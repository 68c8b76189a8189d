"""How code reaches the weights: process groups, DeepSpeed config checks, ZeRO-3 shard geometry, backends."""
