"""exert_ds.evaluation.perplexity: token-level perplexity against a direct computation, the text windows, and the
2-rank ZeRO-3 result against one process."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import pytest
import torch

from exert_ds.data import DataSource
from exert_ds.evaluation.perplexity import perplexity, text_windows
from tests.fixtures import save_tokenizer, write_jsonl
from tests.launch import deepspeed_cpu
from tests.tiny_models import calibration_ids, tiny_lora_model, tiny_model


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep `datasets`' Arrow cache of the test files out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def direct_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp of the mean NLL over every predicted token of every window, one window at a time."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), dim=-1)
            nll -= float(logp.gather(1, ids[1:, None]).sum())
            tokens += ids.numel() - 1
    return math.exp(nll / tokens)


def test_perplexity_matches_direct_computation_for_any_micro_batch():
    model = tiny_model()
    model.train()
    windows = calibration_ids(n=7, length=10)
    want = direct_perplexity(model, windows)
    for micro in (1, 3):
        got = perplexity(model, windows, micro)
        assert got["perplexity"] == pytest.approx(want, rel=1e-6)
        assert got["nll"] == pytest.approx(math.log(want), rel=1e-6)
        assert (got["tokens"], got["windows"]) == (7 * 9, 7)
    assert model.training, "the previous train mode is restored"


def test_ranks_shares_sum_to_the_whole():
    """Three simulated ranks of 7 windows (shares 3, 2, 2), summed as `reduce` would, give the 1-process value."""
    model = tiny_model()
    windows = calibration_ids(n=7, length=10)
    parts = []

    def keep(stats: torch.Tensor) -> torch.Tensor:
        parts.append(stats.clone())
        return stats

    for rank in range(3):
        perplexity(model, windows, 2, rank, 3, reduce=keep)
    total = sum(parts)
    assert int(total[1]) == 7 * 9
    assert math.exp(float(total[0] / total[1])) == pytest.approx(perplexity(model, windows, 2)["perplexity"], rel=1e-6)


def test_text_windows_packs_documents_in_order(tmp_path):
    tok = save_tokenizer(tmp_path / "tok")
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": "fever cough"}, {"text": "dose tablet insulin"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": "heart lung kidney liver"}])
    sources = [DataSource(str(first)), DataSource(str(second))]
    # stream: fever cough </s> dose tablet insulin </s> heart lung kidney liver </s> (12 tokens)
    stream = tok.convert_tokens_to_ids("fever cough </s> dose tablet insulin </s> heart lung kidney liver </s>".split())
    got = text_windows(sources, tok, window=5, max_windows=None)
    assert got.dtype == torch.int64
    assert got.tolist() == [stream[:5], stream[5:10]]  # the 2 remaining tokens are dropped
    assert text_windows(sources, tok, window=3, max_windows=2).tolist() == [stream[:3], stream[3:6]]
    assert text_windows(sources, tok, window=12, max_windows=5).tolist() == [stream]
    with pytest.raises(ValueError, match="at least one window of 13 tokens"):
        text_windows(sources, tok, window=13, max_windows=None)


def test_perplexity_rejects_windows_without_a_prediction():
    with pytest.raises(ValueError, match="2 or more tokens"):
        perplexity(tiny_model(), torch.zeros(3, 1, dtype=torch.long), 1)


@pytest.mark.distributed
def test_two_ranks_under_zero3_equal_one_process(tmp_path):
    out = tmp_path / "ppl.pt"
    deepspeed_cpu(["tests/workers/perplexity_worker.py", "--out", str(out)], ranks=2)
    want = perplexity(tiny_lora_model("llama-odd"), calibration_ids(n=5, length=16), 5)
    for micro, got in torch.load(out).items():
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5), f"micro_batch {micro}"
        assert (got["tokens"], got["windows"]) == (want["tokens"], want["windows"]) == (5 * 15, 5)
