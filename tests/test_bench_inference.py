"""eval/bench_inference.py and eval/inference_table.py on CPU: the run records dense timings and, where the 2:4
kernels cannot run (here: no CUDA), their error in place of a number; the table's speed-ups are dense/sparse time
and sparse/dense tokens/s from one run; exert-ds eval --sparse-kernels says in one line that it needs CUDA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from exert_ds.cli import main as cli
from exert_ds.errors import ConfigError
from exert_ds.evaluation.sparse_kernels import check_two_four, semi_structured_weights
from tests.tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@cpu_only
def test_cpu_run_records_dense_times_and_kernel_errors(tmp_path):
    import bench_inference
    import inference_table

    raw = tmp_path / "raw.json"
    args = ["--shapes", str(REPO / "eval/configs/tiny_llama_cpu"), "--seq", "16", "--prefill-batches", "1,2"]
    args += ["--decode-batches", "1", "--prompt", "4", "--decode-steps", "2", "--warmup", "0", "--iters", "1"]
    results = bench_inference.main([*args, "--repeats", "1", "--out", str(raw)])
    assert json.loads(raw.read_text()) == results
    layers = results["shapes"]["tiny_llama_cpu"]["layers"]
    assert {r["role"] for r in layers} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert {(r["phase"], r["tokens"]) for r in layers} == {("prefill", 16), ("prefill", 32), ("decode", 1)}
    for row in layers:
        if row["variant"] == "dense":
            assert row["seconds"] > 0 and "error" not in row
        else:
            assert "Only CUDA tensors" in row["error"] and "seconds" not in row
    model = results["shapes"]["tiny_llama_cpu"]["model"]
    assert [r["tokens_per_s"] > 0 for r in model["prefill"] if r["variant"] == "dense"] == [True, True]
    assert all("need a CUDA GPU" in r["error"] for r in model["decode"] + model["prefill"] if r["variant"] != "dense")
    text = inference_table.main([str(raw), "--out", str(tmp_path / "inference.md")])
    assert "| q | 128 × 128 | prefill | 16 |" in text and "error [1]" in text and "- [1] RuntimeError" in text
    assert results["command"] in text and results["environment"]["torch"] in text


def test_table_speedups_are_ratios_within_the_run():
    import inference_table

    layer = {"role": "up", "shape": [8, 4], "phase": "prefill", "tokens": 2048}
    results = {
        "command": "c",
        "date": "d",
        "environment": {"device": "H200", "host": "h", "torch": "2.11"},
        "shapes": {
            "s": {
                "layers": [
                    layer | {"variant": "dense", "seconds": 2e-3},
                    layer | {"variant": "cusparselt", "seconds": 1e-3, "match_bf16": True, "rel_error": 1e-3},
                    layer | {"variant": "cutlass", "error": "RuntimeError: shape"},
                ],
                "model": {
                    "prefill": [
                        {"variant": "dense", "batch": 2, "tokens": 4096, "tokens_per_s": 1000.0},
                        {"variant": "cusparselt", "batch": 2, "tokens": 4096, "tokens_per_s": 1500.0},
                    ],
                    "decode": [
                        {"variant": "dense", "batch": 16, "seconds_per_token": 0.02},
                        {"variant": "cutlass", "batch": 16, "seconds_per_token": 0.025},
                    ],
                },
            }
        },
    }
    text = inference_table.render(results)
    assert "| up | 8 × 4 | prefill | 2048 | 2 | 1 (2.00×) | error [1] | cuSPARSELt yes (rel 1.0e-03) |" in text
    assert "| 2 × 2048 | 1e+03 | 1.5e+03 (1.50×) | not measured |" in text
    assert "| batch 16 | 20 | not measured | 25 (0.80×) |" in text
    assert "- [1] RuntimeError: shape" in text


def test_bench_needs_an_output(monkeypatch):
    import bench_inference

    monkeypatch.delenv("OUT", raising=False)
    with pytest.raises(SystemExit):
        bench_inference.parse_args([])
    monkeypatch.setenv("OUT", "/somewhere")
    assert bench_inference.parse_args([]).out == "/somewhere/inference.json"


@cpu_only
def test_two_four_check_names_the_matrix_and_row():
    weight = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 4.0]] * 3)
    check_two_four("layers.0.up", weight)
    weight[1, 5] = 5.0
    with pytest.raises(ConfigError, match="layers.0.up row 1 has a group of 4 with more than 2 non-zeros"):
        check_two_four("layers.0.up", weight)
    with pytest.raises(ConfigError, match="need a CUDA GPU"):
        with semi_structured_weights(tiny_model("llama-24")):
            pass


@cpu_only
def test_eval_sparse_kernels_on_cpu_is_one_line(tmp_path, capsys):
    args = ["eval", "--model", str(tmp_path), "--perplexity", "x=y.jsonl", "--sparse-kernels", "2:4", "--out", "r"]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exert-ds: error: --sparse-kernels 2:4: ") and "need a CUDA GPU" in err
    assert "\n" not in err
