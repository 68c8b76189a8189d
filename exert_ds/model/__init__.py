"""The model: decoder roles and geometry, PEFT LoRA attachment, loading from the hub, a folder or a GGUF file."""
