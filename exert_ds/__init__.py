"""exert_ds: EfficientXpert (ForeSight Mask + Partial Brain Surgeon) inside DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
