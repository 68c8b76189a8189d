"""`exert-ds analyze`: Grassmann distances against float64 references, mask overlap with known answers, the
readers (sparse experts, HF directories, PEFT adapters, checkpoints), projection energy, plots and bad input."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from exert_ds.analysis.adapters import load_adapters
from exert_ds.analysis.energy import energy_differences, projection_energy
from exert_ds.analysis.masks import expected_random_iou, mask_overlap
from exert_ds.analysis.sources import open_source
from exert_ds.analysis.subspaces import grassmann_distance, orthonormal_basis, principal_angles, weight_distances
from exert_ds.cli import main
from exert_ds.prune.foresight import foresight_scores, row_mask
from exert_ds.roles import LLAMA_LIKE_ROLES, ROLES
from exert_ds.runtime.access import DenseBackend
from exert_ds.storage.expert import write_expert
from tests.fixtures import health_sentences, run_yaml, save_tokenizer, write_jsonl
from tests.launch import REPO, deepspeed_cpu
from tests.tiny_models import calibration_ids, tiny_lora_model, tiny_model


def reference_angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Principal angles the textbook way, float64: arccos of the singular values of Q1ᵀQ2 (QR bases), ascending."""
    q1, _ = torch.linalg.qr(x.double())
    q2, _ = torch.linalg.qr(y.double())
    return torch.arccos(torch.linalg.svdvals(q1.T @ q2).clamp(-1, 1))


def rotated_pair(angles: list[float], n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Bases of two subspaces of R^n with the given principal angles, turned by one random rotation."""
    p = len(angles)
    x = torch.zeros(n, p, dtype=torch.float64)
    y = torch.zeros(n, p, dtype=torch.float64)
    for i, theta in enumerate(angles):
        x[i, i] = 1.0
        y[i, i], y[p + i, i] = math.cos(theta), math.sin(theta)
    rotation, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    return rotation @ x, rotation @ y


def test_principal_angles_of_known_subspaces_match_the_float64_reference():
    angles = [0.2, 0.7, 1.3]
    x, y = rotated_pair(angles)
    got = principal_angles(orthonormal_basis(x), orthonormal_basis(y))
    assert torch.allclose(got, torch.tensor(angles, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(got, reference_angles(x, y), atol=1e-10)
    assert grassmann_distance(x, y) == pytest.approx(math.sqrt(sum(a * a for a in angles)), abs=1e-12)
    wide = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # p ≠ q
    assert torch.allclose(principal_angles(orthonormal_basis(x), orthonormal_basis(wide)), reference_angles(x, wide))


def test_grassmann_distance_is_zero_for_one_subspace_and_invariant_to_a_change_of_basis():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, dtype=torch.float64, generator=gen)
    mix = torch.randn(4, 4, dtype=torch.float64, generator=gen)  # invertible (almost surely): same span
    assert grassmann_distance(x, x @ mix) < 1e-7
    y = torch.randn(30, 4, dtype=torch.float64, generator=gen)
    assert grassmann_distance(x @ mix, y @ mix.T) == pytest.approx(grassmann_distance(x, y), abs=1e-10)
    near = rotated_pair([1e-7, 3e-6])  # arccos alone would lose these to rounding: cos = 1 − 5e-15
    got = principal_angles(*[orthonormal_basis(t) for t in near])
    assert torch.allclose(got, torch.tensor([1e-7, 3e-6], dtype=torch.float64), rtol=1e-6, atol=0)


def test_orthogonal_subspaces_are_pi_over_two_per_angle_apart():
    x, y = rotated_pair([math.pi / 2] * 3)
    assert torch.allclose(
        principal_angles(orthonormal_basis(x), orthonormal_basis(y)), torch.full((3,), math.pi / 2).double()
    )
    assert grassmann_distance(x, y) == pytest.approx(math.pi / 2 * math.sqrt(3), abs=1e-12)


def test_adapter_against_its_weight_top_singular_subspaces():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 10, generator=gen)
    u, _, vh = torch.linalg.svd(weight.double())
    a = torch.randn(3, 3, dtype=torch.float64, generator=gen) @ vh[:3]  # row space = top-3 right singular vectors
    b = u[:, :3] @ torch.randn(3, 3, dtype=torch.float64, generator=gen)
    same = weight_distances(a, b, weight)
    assert same["col_B"] < 1e-6 and same["row_A"] < 1e-6
    far = weight_distances(vh[3:6], u[:, 3:6], weight)  # orthogonal complements: π/2 per angle
    assert far["col_B"] == pytest.approx(math.pi / 2 * math.sqrt(3)) and far["row_A"] == pytest.approx(far["col_B"])


def test_mask_overlap_known_answers():
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(16, 40, generator=gen) > 0.5
    same = mask_overlap(keep, keep.clone())
    assert same.iou == 1.0 and same.identical_rows == 1.0 and same.chance_corrected == 1.0
    disjoint = mask_overlap(keep, ~keep)
    assert disjoint.iou == 0.0 and disjoint.identical_rows == 0.0
    other = torch.rand(16, 40, generator=gen) > 0.3
    got = mask_overlap(keep, other)
    assert got.iou == pytest.approx(float((keep & other).sum() / (keep | other).sum()))
    assert got.kept_a == pytest.approx(float(keep.float().mean()))


def test_random_masks_meet_the_expected_iou():
    rows, n, k = 400, 200, 100  # 50% sparsity: k / (2n − k) = 1/3
    gen = torch.Generator().manual_seed(1)

    def random_mask() -> torch.Tensor:
        return row_mask(torch.rand(rows, n, generator=gen), 1 - k / n)

    got = mask_overlap(random_mask(), random_mask())
    assert got.random_iou == pytest.approx(k / (2 * n - k), abs=1e-12)
    assert got.iou == pytest.approx(k / (2 * n - k), abs=0.01)
    assert abs(got.chance_corrected) < 0.02
    counts = torch.tensor([10, 50])  # rows of different sparsity, against a Monte Carlo estimate of the pooled ratio
    inter = union = 0
    for _ in range(4000):
        a = [torch.randperm(60, generator=gen)[:c] for c in counts]
        b = [torch.randperm(60, generator=gen)[:c] for c in (30, 20)]
        for x, y in zip(a, b, strict=True):
            common = len(set(x.tolist()) & set(y.tolist()))
            inter, union = inter + common, union + len(x) + len(y) - common
    assert expected_random_iou(counts, torch.tensor([30, 20]), 60) == pytest.approx(inter / union, rel=0.01)


def pruned_model_dir(out: Path, family: str, seed: int, sparsity: float = 0.5):
    """A tiny model whose seven projections are pruned per row (random scores), saved as an HF directory."""
    model = tiny_model(family, layers=2, vocab=len(save_tokenizer(out)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(tuple(f"{p}.weight" for p in LLAMA_LIKE_ROLES.values())):
                param.mul_(row_mask(torch.rand(param.shape, generator=gen), sparsity))
    model.save_pretrained(out)
    return model


def test_masks_command_on_gqa_experts_and_hf_dirs(tmp_path):
    a = pruned_model_dir(tmp_path / "a", "qwen2", seed=1)  # Qwen2 GQA: k, v have 18 rows against q's 36
    pruned_model_dir(tmp_path / "b", "qwen2", seed=2)
    write_expert(a, save_tokenizer(tmp_path / "tok"), tmp_path / "a_expert", sparsity=0.5)
    assert main(["analyze", "masks", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "hf")]) == 0
    assert (
        main(["analyze", "masks", str(tmp_path / "a_expert"), str(tmp_path / "b"), "--out", str(tmp_path / "x")]) == 0
    )
    from_hf = json.loads((tmp_path / "hf" / "masks-a-vs-b.json").read_text())["roles"]
    from_expert = json.loads((tmp_path / "x" / "masks-a_expert-vs-b.json").read_text())["roles"]
    assert from_hf == from_expert
    assert set(from_hf) == set(ROLES) and all(len(rows) == 2 for rows in from_hf.values())
    wa, wb = (open_source(tmp_path / d).tensor("model.layers.1.self_attn.k_proj.weight") != 0 for d in "ab")
    assert wa.shape == (18, 36)
    assert from_hf["k"][1]["iou"] == pytest.approx(float((wa & wb).sum() / (wa | wb).sum()))
    assert from_hf["k"][1]["random_iou"] == pytest.approx(18 / (72 - 18))  # 18 of 36 kept per row
    for field in ("iou", "chance_corrected", "identical_rows"):
        png = tmp_path / "hf" / f"masks-a-vs-b-{field}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_bad_input_gets_one_line(tmp_path, capsys):
    pruned_model_dir(tmp_path / "qwen", "qwen2", seed=1)
    pruned_model_dir(tmp_path / "llama", "llama", seed=1)
    pruned_model_dir(tmp_path / "llama2", "llama", seed=3)
    cases = [
        (["masks", "qwen", "llama"], "is another model than"),
        (["masks", "llama", "llama2", "--roles", "q,x"], "unknown role 'x'"),
        (["masks", "llama", "nowhere"], "nowhere is not a directory"),
        (["subspaces", "llama", "llama2"], "no adapter_model.safetensors and no training checkpoint"),
    ]
    capsys.readouterr()  # the fixtures' own progress bars
    for args, message in cases:
        args = [a if a.startswith("-") or a in ("masks", "subspaces") or "," in a else str(tmp_path / a) for a in args]
        assert main(["analyze", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("exert-ds: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()  # nothing partial written


def saved_adapter(out: Path, seed: int, drop: str | None = None) -> dict[str, torch.Tensor]:
    """A tiny Qwen2 (GQA) LoRA model's adapter saved as a PEFT directory (optionally without one module)."""
    model = tiny_lora_model("qwen2", seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.normal_()
    model.save_pretrained(out)
    state = get_peft_model_state_dict(model)
    if drop:
        save_file({k: v for k, v in state.items() if drop not in k}, out / "adapter_model.safetensors")
    return state


def test_subspaces_command_against_the_formula(tmp_path, capsys):
    one = saved_adapter(tmp_path / "one", seed=0)
    two = saved_adapter(tmp_path / "two", seed=5)
    base = tmp_path / "base"
    tiny_model("qwen2", vocab=len(save_tokenizer(base))).save_pretrained(base)
    args = ["analyze", "subspaces", str(tmp_path / "one"), str(tmp_path / "two"), "--base", str(base)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "subspaces.json").read_text())
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_{}.weight"
    a1, b1, a2, b2 = one[key.format("A")], one[key.format("B")], two[key.format("A")], two[key.format("B")]
    row = result["pairs"]["one vs two"]["v"][1]
    assert row["col_B"] == pytest.approx(float(reference_angles(b1, b2).square().sum().sqrt()), abs=1e-6)
    assert row["row_A"] == pytest.approx(float(reference_angles(a1.T, a2.T).square().sum().sqrt()), abs=1e-6)
    weight = open_source(base).tensor("model.layers.1.self_attn.v_proj.weight")
    u, _, vh = torch.linalg.svd(weight.double())
    to_w = result["to_weights"]["one"]["v"][1]
    assert to_w["col_B"] == pytest.approx(float(reference_angles(b1, u[:, :4]).square().sum().sqrt()), abs=1e-6)
    assert to_w["row_A"] == pytest.approx(float(reference_angles(a1.T, vh[:4].T).square().sum().sqrt()), abs=1e-6)
    for name in ("pairs-col_B", "pairs-row_A", "weights-col_B", "weights-row_A"):
        assert (tmp_path / "out" / f"subspaces-{name}.png").stat().st_size > 1000
    saved_adapter(tmp_path / "short", seed=1, drop="layers.1.mlp.down_proj")
    capsys.readouterr()
    assert (
        main(["analyze", "subspaces", str(tmp_path / "one"), str(tmp_path / "short"), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == "exert-ds: error: short has no adapter for block 1 role 'down'; give adapters of every block"


def test_energy_matches_a_plain_computation_on_gqa(tmp_path):
    model = tiny_model("qwen2", layers=2).eval()
    ids = calibration_ids(n=4, length=10)
    got = projection_energy(model, ids, 2, DenseBackend().all_reduce, DenseBackend().whole_block)
    inputs, outputs = {}, {}

    def keep(role: str):
        def hook(_m, args, out):
            inputs.setdefault(role, []).append(args[0].reshape(-1, args[0].shape[-1]))
            outputs.setdefault(role, []).append(out.reshape(-1, out.shape[-1]))

        return hook

    layer = model.model.layers[1]
    handles = [layer.get_submodule(path).register_forward_hook(keep(r)) for r, path in LLAMA_LIKE_ROLES.items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    tokens = ids.numel()
    assert got["tokens"] == tokens
    weights = {r: layer.get_submodule(p).weight.detach() for r, p in LLAMA_LIKE_ROLES.items()}
    energy = {r: torch.cat(inputs[r]).double().square().sum(0) for r in ROLES}
    scores = foresight_scores(weights, {r: e.float() / tokens for r, e in energy.items()}, 6, 3)
    for role in ROLES:
        row = got["roles"][role][1]
        assert row["input_energy"] == pytest.approx(float(energy[role].sum()) / tokens, rel=1e-5)
        assert row["output_energy"] == pytest.approx(
            float(torch.cat(outputs[role]).double().square().sum()) / tokens, rel=1e-5
        )
        assert row["foresight_mean"] == pytest.approx(float(scores[role].double().mean()), rel=1e-5)
    assert got["roles"]["down"][1]["companion_rms"] == 1.0
    k_norm = weights["k"].view(3, 6, 36).square().sum(1).sqrt()  # q's companion: k's per-head column norms
    assert got["roles"]["q"][1]["companion_rms"] == pytest.approx(float(k_norm.square().mean().sqrt()), rel=1e-5)
    same = energy_differences(got, got)
    assert all(r["profile"] < 1e-12 and r["output_log_ratio"] == 0 for rows in same.values() for r in rows)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 2-rank training run with save_event_adapters (events before step 3 and at the end) and a checkpoint after
    every step, so the checkpoints step-3 (events done 0) and step-4 hold the adapters the two events merged (the
    warm-up gives the first steps a learning rate of 0: B is still 0 at step 2)."""
    tmp = tmp_path_factory.mktemp("analysis_run")
    config = run_yaml(
        tmp,
        prune={"sparsity": 0.5, "every_steps": 3},
        train={"max_steps": 4, "save_every_steps": 1, "keep_checkpoints": 10, "save_event_adapters": True},
    )
    deepspeed_cpu(["--module", "exert_ds", "train", "--config", str(config)], ranks=2)
    return tmp, config


@pytest.mark.distributed
def test_event_adapters_equal_the_checkpointed_masters_and_load_in_peft(two_rank_run, tmp_path):
    tmp, _ = two_rank_run
    run = tmp / "run"
    checkpoints = {
        0: run / "checkpoints" / "step-00000003-event-000",
        1: run / "checkpoints" / "step-00000004-event-001",
    }
    for event, checkpoint in checkpoints.items():
        saved = load_adapters(run / "event_adapters" / f"event-{event}")
        reassembled = load_adapters(checkpoint)  # the two ranks' fp32 slices put back together
        assert saved.keys() == reassembled.keys() and len(saved) == 2 * 7
        for key, (a, b) in saved.items():
            assert torch.equal(a, reassembled[key][0]) and torch.equal(b, reassembled[key][1]), key
            assert b.any(), key  # trained, not the re-initialised B = 0
    base = AutoModelForCausalLM.from_pretrained(tmp / "model")
    peft = PeftModel.from_pretrained(base, run / "event_adapters" / "event-0")
    state = get_peft_model_state_dict(peft)
    a, b = load_adapters(run / "event_adapters" / "event-0")[(1, "o")]
    assert torch.equal(state["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"], a)
    assert torch.equal(state["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"], b)
    args = ["analyze", "subspaces", str(run / "event_adapters" / "event-0"), str(checkpoints[0])]
    assert (
        main([*args, str(run / "event_adapters" / "event-1"), "--base", str(tmp / "model"), "--out", str(tmp_path)])
        == 0
    )
    result = json.loads((tmp_path / "subspaces.json").read_text())
    same = result["pairs"]["event-0 vs step-00000003-event-000"]
    assert all(row[s] < 1e-6 for rows in same.values() for row in rows for s in ("col_B", "row_A"))
    assert all(row["col_B"] > 0.1 for rows in result["pairs"]["event-0 vs event-1"].values() for row in rows)


@pytest.mark.distributed
def test_two_rank_expert_gives_the_analysis_of_its_hf_export(two_rank_run, tmp_path):
    tmp, _ = two_rank_run
    run = tmp / "run"
    pruned_model_dir(tmp_path / "other", "llama-odd", seed=4)
    for model, out in ((run / "expert", "from_expert"), (run / "final", "from_hf")):
        assert main(["analyze", "masks", str(model), str(tmp_path / "other"), "--out", str(tmp_path / out)]) == 0
    from_expert = json.loads((tmp_path / "from_expert" / "masks-expert-vs-other.json").read_text())["roles"]
    from_hf = json.loads((tmp_path / "from_hf" / "masks-final-vs-other.json").read_text())["roles"]
    assert from_expert == from_hf
    assert all(0 < row["iou"] < 1 for rows in from_hf.values() for row in rows)


@pytest.mark.distributed
def test_energy_on_two_zero3_ranks_equals_one_process(two_rank_run, tmp_path):
    tmp, config = two_rank_run
    text = tmp / "health.jsonl"
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": s} for s in health_sentences(80, seed=9)])
    data = ["--data", f"run={config}", "--data", f"other={other}:body", "--num-samples", "8", "--seq-len", "16"]
    two = tmp_path / "two"
    deepspeed_cpu(
        ["--module", "exert_ds", "analyze", "energy", "--model", str(tmp / "run" / "expert"), *data,
         "--micro-batch", "2", "--deepspeed", str(REPO / "ds_configs" / "zero3_cpu.json"), "--out", str(two)],
        ranks=2,
    )  # fmt: skip
    one = tmp_path / "one"
    assert main(["analyze", "energy", "--model", str(tmp / "run" / "final"), *data, "--out", str(one)]) == 0
    got, want = (json.loads((d / "energy.json").read_text()) for d in (two, one))
    assert got["zero3"] and got["world_size"] == 2 and not want["zero3"]
    assert got["data"]["run"] == [str(text)]
    for name in ("run", "other"):
        for role in ROLES:
            for g, w in zip(got["results"][name]["roles"][role], want["results"][name]["roles"][role], strict=True):
                assert g == pytest.approx(w, rel=1e-5), (name, role)
    assert got["differences"]["run vs other"]["q"][0]["profile"] > 0
    for png in ("energy-output_energy", "energy-input_energy", "energy-foresight_mean", "energy-profile-distance"):
        assert (two / f"{png}.png").stat().st_size > 1000


def test_report_writer_computes_the_answer_from_the_outputs(tmp_path, monkeypatch):
    """write_report.py on the outputs of the three analyses of tiny models named as run_analysis.py names its runs
    (figures stubbed: the tests above draw them; here they would take most of the time)."""
    sys.path.insert(0, str(REPO / "eval" / "analysis"))
    import write_report

    from exert_ds.analysis import plots

    for figure in ("heatmap", "layer_lines"):
        monkeypatch.setattr(plots, figure, lambda *args, **_: args[3].write_bytes(b"stub"))

    out, runs = tmp_path / "out", ("health-s0", "health-s1", "legal-s0", "qtype-s0", "answers-s0")
    for seed, run in enumerate(runs):
        pruned_model_dir(tmp_path / run, "llama", seed=seed)
        saved_adapter(tmp_path / f"adapter-{run}", seed=seed)
    names = ["--names", ",".join(runs)]
    assert main(["analyze", "masks", *(str(tmp_path / r) for r in runs), *names, "--out", str(out / "masks")]) == 0
    adapters = [str(tmp_path / f"adapter-{r}") for r in runs]
    for which in ("event0", "final"):
        assert main(["analyze", "subspaces", *adapters, *names, "--out", str(out / "subspaces" / which)]) == 0
    data = []
    for seed, name in enumerate(("health", "legal", "qtype", "answers")):
        path = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": s} for s in health_sentences(40, seed=seed)])
        data += ["--data", f"{name}={path}"]
    small = ["--num-samples", "4", "--seq-len", "8"]
    for seed in (0, 1):
        energy_out = str(out / "energy" / f"base-seed{seed}")
        assert main(["analyze", "energy", "--model", str(tmp_path / "health-s0"), *data, *small, "--seed", str(seed), "--out", energy_out]) == 0  # fmt: skip
    for run in ("health-s0", "health-s1", "legal-s0"):
        assert main(["analyze", "energy", "--model", str(tmp_path / run), *data[:4], *small, "--out", str(out / "energy" / run)]) == 0  # fmt: skip
    page = write_report.render(out, "analysis")
    masks = json.loads((out / "masks" / "masks-health-s0-vs-legal-s0.json").read_text())["roles"]
    task = json.loads((out / "masks" / "masks-qtype-s0-vs-answers-s0.json").read_text())["roles"]
    domain_mean = sum(1 - r["iou"] for rows in masks.values() for r in rows) / 14
    task_mean = sum(1 - r["iou"] for rows in task.values() for r in rows) / 14
    wins = sum(1 - a["iou"] > 1 - b["iou"] for role in ROLES for a, b in zip(masks[role], task[role], strict=True))
    row = next(line for line in page.splitlines() if line.startswith("| mask: 1 − IoU of kept sets |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == f"{domain_mean:.4f}" and cells[2] == f"{task_mean:.4f}"
    assert cells[5] == f"{'larger' if domain_mean > task_mean else 'not larger'} ({wins}/14 cells)"  # domain vs task
    assert all(len(line.split("|")) == len(row.split("|")) for line in page.splitlines() if line.startswith("| "))
    measures = [line for line in page.splitlines() if line.startswith(("| mask:", "| subspace:", "| energy:"))]
    assert len(measures) == 3 + 4 + 2 + 2 * 2  # masks; col/row × event 0/final; dense model; experts on 2 data sets
    assert "n/a" not in "".join(measures[:7])  # masks and subspaces: every pairing and question answered
    assert "(analysis/masks/masks-health-s0-vs-legal-s0-iou.png)" in page
