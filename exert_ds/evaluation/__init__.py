"""`exert-ds eval`: tasks, label scoring, perplexity, metrics, the sparsity report, the relative-performance table."""
