"""exert_ds.demo.quickstart.prepare: the run YAML it writes for a relative work folder (launch/quickstart.sh's default,
runs/quickstart) loads and names the files it wrote, from any working directory."""

import json
from pathlib import Path

from exert_ds.config import load_config
from exert_ds.demo import quickstart


def test_relative_workdir_gives_a_config_that_loads_anywhere(tmp_path, monkeypatch):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"")  # the config only checks that the file exists

    def corpus(out_path):
        Path(out_path).write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20)))
        return Path(out_path)

    monkeypatch.setattr(quickstart, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(quickstart, "health_corpus", corpus)
    workdir = tmp_path / "repo" / "runs" / "quickstart"
    (workdir / "tokenizer").mkdir(parents=True)
    (workdir / "tokenizer" / "tokenizer.json").write_text("{}")  # prepare reads the GGUF's tokenizer only once
    monkeypatch.chdir(tmp_path / "repo")
    config = quickstart.prepare(Path("runs/quickstart"))

    monkeypatch.chdir(tmp_path)  # the launcher may start elsewhere: the YAML's paths must not depend on it
    cfg = load_config(config)
    assert Path(cfg.data.train[0].path) == workdir / "health_train.jsonl"
    assert Path(cfg.eval.perplexity[0].path) == workdir / "health_heldout.jsonl"
    assert Path(cfg.model.tokenizer) == workdir / "tokenizer"
    assert Path(cfg.train.output_dir) == workdir / "run"
    assert len(Path(cfg.data.train[0].path).read_text().splitlines()) == 18  # every 10th record held out
