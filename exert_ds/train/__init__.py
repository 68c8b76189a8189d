"""`exert-ds train` and `exert-ds prune`: the LoRA run with prune events inside a DeepSpeed ZeRO-3 engine."""
