"""`exert-ds analyze`: the paper's domain-structure analysis (mask overlap, LoRA subspaces, projection energy)."""
