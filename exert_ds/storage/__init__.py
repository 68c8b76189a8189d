"""What is written: atomic folders, the sparse codec, checkpoints, the sparse expert, its export and inspection."""
