"""The sparse expert (per-rank files + manifest), the streaming export to a Hugging Face directory, and
`exert-ds inspect`: checked against the weights themselves, stock `from_pretrained` and damaged files."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from exert_ds.cli import main
from exert_ds.errors import ConfigError
from exert_ds.model.lora import attach_lora
from exert_ds.storage import sparse_codec
from exert_ds.storage.checkpoint import unpack_sparse
from exert_ds.storage.expert import check_promise, expert_tensors, pruned_roles, write_expert
from exert_ds.storage.export import export_expert
from exert_ds.storage.manifest import EXPERT_MANIFEST as MANIFEST
from exert_ds.storage.manifest import expert_rank_file as rank_file
from exert_ds.storage.manifest import is_expert_dir
from exert_ds.storage.safetensors_stream import SafetensorsStream
from tests.fixtures import READ_ONLY, run_yaml, save_tokenizer, small_tmpfs
from tests.launch import deepspeed_cpu
from tests.tiny_models import tiny_model

IDS = torch.tensor([[1, 5, 7, 9, 11, 4, 6]])


def hf_state(model) -> dict[str, torch.Tensor]:
    """Base weights of a (PEFT-wrapped) model under their Hugging Face names."""
    return {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v
        for k, v in model.state_dict().items()
        if "lora_" not in k
    }


@torch.no_grad()
def prune_by_magnitude(model, sparsity: float) -> None:
    """Plain torch: zero the floor(p·in) smallest-magnitude entries of every row of the seven projections."""
    roles = pruned_roles(model)
    for param in model.parameters():
        if id(param) in roles:
            k = math.floor(sparsity * param.shape[1])
            param.scatter_(1, param.abs().float().argsort(dim=1, stable=True)[:, :k], 0)


def pruned_tiny(tmp_path, family="llama-odd", dtype=torch.float32, sparsity=0.5):
    tokenizer = save_tokenizer(tmp_path / "tokenizer")
    model = attach_lora(tiny_model(family, vocab=len(tokenizer), dtype=dtype), {"r": 4})
    prune_by_magnitude(model, sparsity)
    return model.eval(), tokenizer


def stock_logits(path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_stream_writer_is_read_by_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "empty": torch.zeros(0, dtype=torch.uint8),
        "c": torch.arange(11, dtype=torch.int64),
        "d": torch.randn(2, 2).half(),
    }
    stream = SafetensorsStream(tmp_path / "x.safetensors", [(k, v.dtype, v.shape) for k, v in tensors.items()])
    for key, value in tensors.items():
        stream.write(key, value)
    stream.close()
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    wrong = SafetensorsStream(tmp_path / "y.safetensors", [("a", torch.float32, (3, 5))])
    with pytest.raises(ValueError, match="declares"):
        wrong.write("a", torch.zeros(5, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_codec_round_trip_across_chunks_and_escapes(monkeypatch, dtype):
    monkeypatch.setattr(sparse_codec, "CHUNK", 64)  # many chunks, odd offsets into the 4-bit codes
    gen = torch.Generator().manual_seed(0)
    flat = (torch.randn(1001, generator=gen) * torch.logspace(-6, 2, 1001)).to(dtype)  # > 15 distinct top bytes
    flat[torch.randperm(1001, generator=gen)[:500]] = 0
    layout = sparse_codec.plan(flat)
    assert layout.escapes > 0
    pieces = sparse_codec.encode(flat, layout)
    assert [(k, v.dtype, tuple(v.shape)) for k, v in pieces.items()] == sparse_codec.specs(layout)
    out = torch.empty(1001, dtype=dtype)
    sparse_codec.decode_into(out, pieces.__getitem__)
    assert torch.equal(out, flat)


def test_expert_round_trip_export_and_stock_loading(tmp_path):
    model, tokenizer = pruned_tiny(tmp_path, dtype=torch.bfloat16)
    expert = write_expert(model, tokenizer, tmp_path / "expert", sparsity=0.5)
    assert is_expert_dir(expert) and not is_expert_dir(tmp_path)
    assert sorted(p.name for p in expert.iterdir() if "rank" in p.name) == [rank_file(0, 1)]
    want = hf_state(model)
    got = dict(expert_tensors(expert))
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    single = export_expert(expert, tmp_path / "hf")
    assert {p.name for p in single.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    sharded = export_expert(expert, tmp_path / "hf_sharded", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(want)
    for path in (single, sharded):
        assert torch.equal(stock_logits(path), logits)
    exported = load_file(single / "model.safetensors")
    manifest = json.loads((expert / MANIFEST).read_text())
    sparse = [name for name, entry in manifest["tensors"].items() if entry["storage"] == "sparse"]
    assert len(sparse) == 14
    for name in sparse:
        assert ((exported[name] == 0).sum(1) == math.floor(0.5 * exported[name].shape[1])).all(), name
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export_expert(expert, single)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        export_expert(expert, tmp_path / "a_file", overwrite=True)


def test_shard_limit_below_the_largest_tensor_shards_as_save_pretrained(tmp_path):
    """Issue 21.3: a --max-shard-size below the largest tensor puts each oversized tensor in a shard of its own
    (the planner reorders the tensors); the shards and index are save_pretrained's for the same limit and the
    weights equal a 100KB-shard export's."""
    model, tokenizer = pruned_tiny(tmp_path)
    expert = write_expert(model, tokenizer, tmp_path / "expert", sparsity=0.5)
    manifest = json.loads((expert / MANIFEST).read_text())
    largest = max(math.prod(e["shape"]) * 4 for e in manifest["tensors"].values())
    assert largest > 6000
    assert main(["export", "--ckpt", str(expert), "--out", str(tmp_path / "small"), "--max-shard-size", "6KB"]) == 0
    big = export_expert(expert, tmp_path / "big", max_shard_size="100KB")
    # built from the config, not by from_pretrained: transformers 5 sorts a loaded model's names before sharding
    stock = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(big))
    stock.load_state_dict({k: v for p in big.glob("model*.safetensors") for k, v in load_file(p).items()})
    stock.save_pretrained(tmp_path / "stock", max_shard_size="6KB")
    index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    stock_index = json.loads((tmp_path / "stock" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == stock_index["weight_map"]
    shards = sorted(p.name for p in (tmp_path / "small").glob("model-*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "stock").glob("model-*.safetensors"))
    files = [load_file(tmp_path / "small" / s) for s in shards]
    assert any(len(f) == 1 and sum(t.numel() * 4 for t in f.values()) > 6000 for f in files)
    small = {k: v for f in files for k, v in f.items()}
    want = {k: v for p in big.glob("model*.safetensors") for k, v in load_file(p).items()}
    assert small.keys() == want.keys() and all(torch.equal(small[k], want[k]) for k in want)


def test_refused_writes_are_one_line_naming_the_path(tmp_path):
    """Issue 21.4's kind: the expert, the export and TensorBoard on a read-only file system, and an
    export onto a full one, stop with one WriteError naming the path and the OS error, and leave nothing."""
    from exert_ds.storage.atomic import WriteError
    from exert_ds.train.trainer import Logger

    model, tokenizer = pruned_tiny(tmp_path)
    expert = write_expert(model, tokenizer, tmp_path / "expert", sparsity=0.5)
    with small_tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(WriteError, match=rf"cannot write {ro}/\.expert\.tmp: {READ_ONLY}"):
            write_expert(model, tokenizer, ro / "expert", sparsity=0.5)
        with pytest.raises(WriteError, match=rf"cannot write {ro}/\.hf\.tmp: {READ_ONLY}"):
            export_expert(expert, ro / "hf")
        logger = Logger(ro, rank=0)
        with pytest.raises(WriteError, match=rf"cannot write {ro}/tensorboard: {READ_ONLY}"):
            logger.shared.share()
        assert not list(ro.iterdir())
    with small_tmpfs(tmp_path / "full", size="24k") as full:
        with pytest.raises(WriteError, match=rf"cannot write {full}/\.hf\.tmp/model.safetensors: No space left"):
            export_expert(expert, full / "hf")
        assert not list(full.iterdir())


def test_pruned_storage_at_half_sparsity_is_below_056_of_dense_bf16(tmp_path):
    model, tokenizer = pruned_tiny(tmp_path, family="llama", dtype=torch.bfloat16)  # even widths: exactly 50%
    expert = write_expert(model, tokenizer, tmp_path / "expert", sparsity=0.5)
    manifest = json.loads((expert / MANIFEST).read_text())
    sparse = [name for name, e in manifest["tensors"].items() if e["storage"] == "sparse"]
    dense_bytes = sum(math.prod(manifest["tensors"][n]["shape"]) * 2 for n in sparse)
    with safe_open(expert / rank_file(0, 1), framework="pt") as fh:
        stored = sum(
            fh.get_tensor(key).numel() * fh.get_tensor(key).element_size()
            for key in fh.keys()
            if key.rsplit(".", 1)[0] in sparse
        )
    assert stored <= 0.56 * dense_bytes, stored / dense_bytes


def test_damaged_files_and_broken_promise_are_named(tmp_path, capsys):
    model, tokenizer = pruned_tiny(tmp_path)
    good = write_expert(model, tokenizer, tmp_path / "expert", sparsity=0.5)
    capsys.readouterr()  # the writer's progress bar is not the CLI's output
    for damage in ("truncate", "alter", "remove"):
        copy = tmp_path / damage
        shutil.copytree(good, copy)
        file = copy / rank_file(0, 1)
        data = file.read_bytes()
        if damage == "truncate":
            file.write_bytes(data[:-7])
        elif damage == "alter":
            file.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
        else:
            file.unlink()
        assert main(["export", "--ckpt", str(copy), "--out", str(tmp_path / f"hf_{damage}")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{file} is " in err and "damaged" in err, err
        assert not (tmp_path / f"hf_{damage}").exists()
        assert main(["inspect", str(copy)]) == 1
        out = capsys.readouterr().out
        assert "DAMAGED" in out and rank_file(0, 1) in out.split("DAMAGED")[1].splitlines()[0]
    assert main(["inspect", str(good)]) == 0
    assert "integrity: OK" in capsys.readouterr().out
    with torch.no_grad():  # a writer that broke the promise: row 3 of one matrix keeps everything
        weight = model.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight
        weight[3] = 1.0
    broken = write_expert(model, tokenizer, tmp_path / "broken", sparsity=0.5)
    with pytest.raises(
        ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight row 3 has 0 zeros, fewer than the 22"
    ):
        export_expert(broken, tmp_path / "hf_broken")
    assert not (tmp_path / "hf_broken").exists()


def test_n_m_promise_is_checked_per_group(tmp_path):
    weight = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 4.0]] * 3).to(torch.bfloat16)
    entry = {"zeros_per_row": 4}
    check_promise(tmp_path, "w", weight, entry, (2, 4))  # 2 zeros in every group of 4
    weight[2, 5] = 5.0  # row 2, second group: one zero left (the row still has 3)
    with pytest.raises(ConfigError, match="w row 2 has fewer than 2 zeros in a group of 4"):
        check_promise(tmp_path, "w", weight, entry, (2, 4))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One 2-rank training run (a prune event at step 2 and the final one); every test below reads it."""
    tmp = tmp_path_factory.mktemp("expert_run")
    config = run_yaml(tmp, prune={"sparsity": 0.5, "every_steps": 2}, train={"max_steps": 3})
    proc = deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], ranks=2)
    return tmp, proc


def reference_weights(tmp) -> dict[str, torch.Tensor]:
    """What the run's final weights must be, read without the expert code: the pruned projections from the final
    training checkpoint's per-rank sparse partitions, everything else (frozen) from the original model."""
    weights = load_file(tmp / "model" / "model.safetensors")
    root = tmp / "run" / "checkpoints"
    latest = root / (root / "latest").read_text()
    manifest = json.loads((latest / "manifest.json").read_text())
    parts = [torch.load(latest / f"base-rank{r:05d}.pt", weights_only=False) for r in range(2)]
    for name, entry in manifest["params"].items():
        flat = torch.cat([unpack_sparse(part["weights"][name]) for part in parts])
        hf = name.removeprefix("base_model.model.").replace(".base_layer", "")
        weights[hf] = flat.view(entry["shape"])
    return weights


@pytest.mark.distributed
def test_two_rank_expert_equals_the_trained_weights_and_exports(two_rank_run, tmp_path):
    tmp, _ = two_rank_run
    expert = tmp / "run" / "expert"
    manifest = json.loads((expert / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and (expert / rank_file(1, 2)).is_file()
    want = reference_weights(tmp)
    got = dict(expert_tensors(expert))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    final = load_file(tmp / "run" / "final" / "model.safetensors")  # the trainer's own export
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)
    for name, entry in manifest["tensors"].items():
        if entry["storage"] == "sparse":
            assert ((final[name] == 0).sum(1) == math.floor(0.5 * final[name].shape[1])).all(), name

    reference = AutoModelForCausalLM.from_pretrained(tmp / "model", attn_implementation="eager").eval()
    reference.load_state_dict(want)
    with torch.no_grad():
        logits = reference(input_ids=IDS).logits
    assert main(["export", "--ckpt", str(tmp / "run"), "--out", str(tmp_path / "hf")]) == 0  # run dir → expert/
    assert torch.equal(stock_logits(tmp_path / "hf"), logits)

    one_rank = write_expert(reference, save_tokenizer(tmp_path / "tok"), tmp_path / "one", sparsity=0.5)
    from_one = dict(expert_tensors(one_rank))  # the same weights written by 1 rank read back the same
    assert from_one.keys() == got.keys() and all(torch.equal(from_one[k], got[k]) for k in got)


@pytest.mark.distributed
def test_inspect_a_training_checkpoint_and_refuse_to_export_it(two_rank_run, tmp_path, capsys):
    tmp, _ = two_rank_run
    copy = tmp_path / "checkpoints"
    shutil.copytree(tmp / "run" / "checkpoints", copy)
    assert main(["inspect", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "step 3" in out and "prune events done 2" in out and "world size 2" in out, out
    assert "q 0.4889" in out and "down 0.4894" in out and "integrity: OK" in out  # floor(0.5·45)/45, 23/47
    latest = copy / (copy / "latest").read_text()
    assert main(["export", "--ckpt", str(latest), "--out", str(tmp_path / "hf")]) == 2
    assert "is a training checkpoint" in capsys.readouterr().err
    damaged = latest / "base-rank00001.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    assert main(["inspect", str(latest)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "base-rank00001.pt" in out.split("DAMAGED (")[1] and "unavailable" in out
