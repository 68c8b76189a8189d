"""`exert-ds export --format compressed-tensors`: the compressed-tensors package itself decompresses the written
folder to exactly the dense export's weights (sparse-bitmask and sparse-24-bitmask; experts written by 1 and by 2
ranks), and config.json carries the compression config its ModelCompressor reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from exert_ds.cli import main
from exert_ds.errors import ConfigError
from exert_ds.model.lora import attach_lora
from exert_ds.storage.expert import pruned_roles, write_expert
from exert_ds.storage.export import export_expert
from tests.fixtures import run_yaml, save_tiny_model_dir, save_tokenizer
from tests.launch import deepspeed_cpu
from tests.tiny_models import tiny_model

pytest.importorskip("compressed_tensors")


def decompressed(folder) -> dict[str, torch.Tensor]:
    """Every weight of a compressed-tensors folder, read back by the package's own ModelCompressor."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained(str(folder))
    assert compressor is not None and compressor.sparsity_compressor is not None
    return dict(compressor.sparsity_compressor.decompress(str(folder)))


def assert_same_weights_as_dense(expert, tmp_path, fmt: str, structure: str) -> dict:
    dense = load_file(export_expert(expert, tmp_path / "dense") / "model.safetensors")
    assert main(["export", "--ckpt", str(expert), "--out", str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
    got = decompressed(tmp_path / "ct")
    assert got.keys() == dense.keys()
    for name, want in dense.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    sparsity = config["sparsity_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert sparsity["format"] == fmt and sparsity["sparsity_structure"] == structure
    assert sparsity["targets"] == ["Linear"] and set(sparsity["ignore"]) == {"model.embed_tokens", "lm_head"}
    zeros = sum(int((t == 0).sum()) for t in dense.values()) / sum(t.numel() for t in dense.values())
    assert sparsity["global_sparsity"] == pytest.approx(100 * zeros)
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    compressed = [k for k in stored if k.endswith(".compressed")]
    assert len(compressed) == 14 and "model.layers.0.mlp.down_proj.weight" not in stored  # 7 roles × 2 blocks
    return stored


@torch.no_grad()
def pruned_expert(tmp_path, n: int, m: int):
    """A bf16 tiny model with its seven projections pruned by magnitude in plain torch (half of every row, or the
    2 smallest of every group of 4), written by one process."""
    tokenizer = save_tokenizer(tmp_path / "tokenizer")
    model = attach_lora(tiny_model("llama-24", vocab=len(tokenizer), dtype=torch.bfloat16), {"r": 4})
    roles = pruned_roles(model)
    for param in model.parameters():
        if id(param) in roles:
            groups = param.view(param.shape[0], -1, m) if m else param.view(param.shape[0], 1, -1)
            k = n if m else param.shape[1] // 2
            groups.scatter_(2, groups.abs().float().argsort(dim=2, stable=True)[..., :k], 0)
    return write_expert(model.eval(), tokenizer, tmp_path / "expert", sparsity=0.5, n=n, m=m)


def test_unstructured_expert_decompresses_to_the_dense_export(tmp_path):
    expert = pruned_expert(tmp_path, 0, 0)
    stored = assert_same_weights_as_dense(expert, tmp_path, "sparse-bitmask", "unstructured")
    assert stored["model.layers.0.mlp.down_proj.compressed"].numel() == 48 * 36  # half of every 72-wide row kept
    sharded = export_expert(expert, tmp_path / "sharded", max_shard_size="20KB", fmt="compressed-tensors")
    assert (
        len(list(sharded.glob("model-*-of-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    )
    got, want = decompressed(sharded), decompressed(tmp_path / "ct")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_two_four_expert_decompresses_to_the_dense_export(tmp_path):
    stored = assert_same_weights_as_dense(pruned_expert(tmp_path, 2, 4), tmp_path, "sparse-24-bitmask", "2:4")
    assert stored["model.layers.0.mlp.down_proj.compressed"].shape == (48, 36)


@pytest.mark.distributed
@pytest.mark.parametrize("n_m", [(0, 0), (2, 4)], ids=["unstructured", "2of4"])
def test_two_rank_expert_decompresses_to_the_dense_export(tmp_path, n_m):
    n, m = n_m
    config = run_yaml(tmp_path, prune={"scorer": "magnitude", "sparsity": 0.5, "n": n, "m": m}, pbs={"mode": "off"})
    save_tiny_model_dir(tmp_path / "model", family="llama-24")  # widths that 2:4 divides
    deepspeed_cpu(["--module", "exert_ds", "prune", "--config", str(config)], ranks=2)
    expert = tmp_path / "run" / "expert"
    assert json.loads((expert / "expert_manifest.json").read_text())["world_size"] == 2
    fmt, structure = ("sparse-24-bitmask", "2:4") if m else ("sparse-bitmask", "unstructured")
    assert_same_weights_as_dense(expert, tmp_path, fmt, structure)


def test_missing_package_is_one_line(tmp_path, monkeypatch):
    import builtins

    expert = pruned_expert(tmp_path, 0, 0)
    real_import = builtins.__import__

    def no_compressed_tensors(name, *args, **kwargs):
        if name.startswith("compressed_tensors"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_compressed_tensors)
    with pytest.raises(ConfigError, match=r"pip install 'exert_ds\[deploy\]'"):
        export_expert(expert, tmp_path / "ct", fmt="compressed-tensors")
    assert not (tmp_path / "ct").exists()
