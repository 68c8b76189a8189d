"""`exert-ds eval --sparse-kernels 2:4` on a CUDA GPU (issue 17 point 2): the same expert evaluated with torch's 2:4
semi-structured kernels and with its dense weights gives the same label log-likelihoods and perplexity to bf16
tolerance, and the report counts the swapped matrices. Skipped without CUDA (CI is CPU only); run on the GPU with
`python3 -m pytest -q tests/test_sparse_kernels_cuda.py`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from exert_ds.cli import main as cli
from exert_ds.model.architecture import block_linears, decoder_layers
from tests.eval_data import LABEL_WORDS, PROMPT_WORDS, write_task_data
from tests.fixtures import WORDS, save_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's 2:4 kernels need a CUDA GPU")


def two_four_model_dir(out: Path) -> Path:
    """A random LLaMA (GQA) whose projections are 64-aligned, as the kernels ask, pruned to 2:4 by magnitude."""
    tokenizer = save_tokenizer(out, list(dict.fromkeys([*WORDS, *LABEL_WORDS, *PROMPT_WORDS])))
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for block in range(len(decoder_layers(model))):
            for linear in block_linears(model, block).values():
                groups = linear.weight.view(linear.weight.shape[0], -1, 4)  # (out, in/4, 4)
                drop = groups.abs().argsort(dim=-1)[..., :2]
                groups.scatter_(-1, drop, 0.0)
    model.save_pretrained(out)
    return out


def test_eval_with_two_four_kernels_matches_dense_weights(tmp_path):
    model, data = two_four_model_dir(tmp_path / "model"), write_task_data(tmp_path / "data")
    runs = {}
    for name, extra in (("dense", []), ("sparse", ["--sparse-kernels", "2:4"])):
        out = tmp_path / f"{name}.json"
        args = ["eval", "--model", str(model), "--dtype", "bfloat16", "--tasks", "pubmedqa,cuad", "--data-dir"]
        args += [str(data), "--perplexity", f"general={data / 'general.jsonl'}", "--window", "32", "--save-scores"]
        assert cli([*args, "--out", str(out), *extra]) == 0
        runs[name] = json.loads(out.read_text())
    dense, sparse = runs["dense"], runs["sparse"]
    assert sparse["sparse_kernels"] == {"pattern": "2:4", "matrices": 14} and "sparse_kernels" not in dense
    for task in ("pubmedqa", "cuad"):
        want = torch.tensor(dense["tasks"][task]["loglik"], dtype=torch.float64)
        got = torch.tensor(sparse["tasks"][task]["loglik"], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)
    ppl = (dense["perplexity"]["general"]["perplexity"], sparse["perplexity"]["general"]["perplexity"])
    assert abs(ppl[1] / ppl[0] - 1) < 1e-2, ppl
