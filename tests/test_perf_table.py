"""eval/perf_table.py: the ratios and the 70B extrapolation in perf.md, against numbers worked out by hand from
synthetic bench JSON (no timing is measured here)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import perf_table  # noqa: E402


def _meta(world: int, config_dir: str, layers=None, **extra) -> dict:
    args = {"config_dir": config_dir, "layers": layers, "calib_samples": 16, "calib_seq": 2048}
    args.update(pbs="hessian", sparsity=0.5, micro_batch=1, seq=1024)
    return {
        "world_size": world,
        "args": args,
        "date": "2026-11-29T00:00:00+00:00",
        "device": "test",
        "versions": {"torch": "x"},
        "command": "bench",
        **extra,
    }


def _plain(tokens_total: float, step: float, peak: float) -> dict:
    return {
        "phase": "plain",
        "variant": "primary",
        "gradient_checkpointing": True,
        "micro_batch": 4,
        "seq": 1024,
        "step_seconds": [step],
        "median_step_s": step,
        "tokens_per_s_per_gpu": tokens_total,
        "tokens_per_s_total": tokens_total,
        "mfu": 0.25,
        "hfu": 0.375,
        "peak_allocated_gib": [peak, peak - 1],
        "host_peak_rss_gib": [3.0, 3.0],
    }


def _scale_doc(world: int, tokens_total: float) -> dict:
    flops = {"N_matmul_params": 10, "mfu": "4N", "hfu": "6N", "not_counted": "attention", "peak": "989"}
    event = {"seconds": 6.0, "block_seconds": [1.0, 2.5], "pbs_error_reduction": {"q": 0.2, "k": 0.4}}
    return {
        "file": f"w{world}.json",
        "meta": _meta(world, "eval/configs/llama2_7b_shape", flops_convention=flops),
        "measurements": [
            _plain(tokens_total, 2.0, 20.0),
            {
                "phase": "forward",
                "calibration_tokens_total": 65536,
                "calibration_tokens_per_rank": 32768,
                "seconds": 1.5,
            },
            {
                "phase": "schedule",
                "event_every": 3,
                "step_seconds": [2.0] * 5,
                "median_step_s": 2.0,
                "events": [event],
                "event_seconds": [6.0],
                "amortised_step_s": 3.2,
                "peak_allocated_gib": [22.0, 21.0],
                "peak_so_far": [
                    {"after": "step 0", "peak_allocated_gib": [20.5, 20.0]},
                    {"after": "event 0", "peak_allocated_gib": [21.0, 22.0]},
                    {"after": "step 1", "peak_allocated_gib": [21.0, 22.0]},
                ],
            },
            {"phase": "event_tf32", **event, "seconds": 2.4, "pbs_error_reduction": {"q": 0.2, "k": 0.2}},
            {"phase": "collectives", "calls": {"c10d::allgather_": 7, "c10d::allreduce_": 3}},
        ],
    }


def test_ratios_by_hand(tmp_path):
    paths = []
    for world, tokens in ((1, 2000.0), (2, 3800.0)):
        path = tmp_path / f"w{world}.json"
        path.write_text(json.dumps(_scale_doc(world, tokens)))
        paths.append(str(path))
    out = tmp_path / "perf.md"
    perf_table.main(["--out", str(out), *paths])
    text = out.read_text()
    assert "| primary | 2,000 | 3,800 | 1.90× |" in text  # 3800 / 2000
    assert "| 1.600× |" in text  # amortised 3.2 s / plain 2.0 s
    assert "| 1.100× | event 0 |" in text  # peak 22 GiB / 20 GiB, first reached (on rank 1) by event 0
    assert "3.0% / 0.3%" in text  # 6 s / (100 × 2 s), 6 s / (1000 × 2 s)
    assert "| 4.0× |" in text  # event 6 s / forward 1.5 s
    assert "| 30.0% |" in text  # mean PBS error reduction of 0.2 and 0.4
    assert "float32 PBS products 6.0 s, with TF32 (`pbs.matmul_precision: high`) 2.4 s: 2.50× faster" in text
    assert "PBS error reduction 30.0% vs 20.0%" in text
    assert "| run | `c10d::allgather_` | `c10d::allreduce_` |" in text
    assert "| 7 | 3 |" in text


def test_scaling_pairs_each_variant_with_the_1_gpu_run_of_its_config_closest_in_time(tmp_path):
    persistent = "ds_configs/zero3_bf16_persistent.json"
    docs = [(1, 2000.0, "2026-11-29T21:00:00+00:00", None), (1, 1000.0, "2026-11-30T01:00:00+00:00", None)]
    docs += [(1, 500.0, "2026-11-30T01:09:00+00:00", persistent), (2, 3800.0, "2026-11-30T01:10:00+00:00", None)]
    docs += [(2, 1500.0, "2026-11-30T01:11:00+00:00", persistent)]
    paths = []
    for i, (world, tokens, date, ds_config) in enumerate(docs):
        doc = _scale_doc(world, tokens)
        doc["meta"]["date"] = date
        doc["meta"]["args"]["ds_config"] = ds_config
        doc["measurements"].append({**_plain(tokens * 3, 1.0, 30.0), "variant": "nockpt:8"})
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(doc))
        paths.append(str(path))
    out = tmp_path / "perf.md"
    perf_table.main(["--out", str(out), *paths])
    text = out.read_text()
    # the later 1-GPU run of the same DeepSpeed config, not the first one, nor the closest with another config
    assert "| primary | 1,000 | 3,800 | 3.80× | 2026-11-30 01:00 |" in text
    assert "| nockpt:8 | 3,000 | 11,400 | 3.80× | 2026-11-30 01:00 |" in text
    assert "| primary | 500 | 1,500 | 3.00× | 2026-11-30 01:09 |" in text  # persistent with persistent


def test_seventy_b_extrapolation_by_hand(tmp_path):
    doc = {
        "meta": _meta(
            2,
            "eval/configs/llama3_70b_shape",
            layers=3,
            extrapolation_target={"blocks": 80, "gpus": 8, "calib_samples": 128, "calib_seq": 2048},
        ),
        "measurements": [
            {"phase": "block_forward", "block_seconds": [0.9, 0.5, 0.5]},
            {
                "phase": "event",
                "seconds": 14.0,
                "block_seconds": [6.0, 4.0, 4.0],
                "sparsity": {"q": 0.5},
                "peak_allocated_gib": [30.0, 30.0],
                "host_peak_rss_gib": [9.0, 9.0],
            },
        ],
    }
    path = tmp_path / "r70.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "perf.md"
    perf_table.main(["--out", str(out), str(path)])
    text = out.read_text()
    # steady blocks 1..2: t_block = 4.0, t_fwd = 0.5 → t_tok = 1.0, t_row = 3.0; calibration ×8
    # ideal: 80 × (1.0 × 8 + 3.0) × 2/8 = 220 s; t_row not parallel: 80 × (1.0 × 8 × 2/8 + 3.0) = 400 s
    assert "= **3.7 min**" in text
    assert "= **6.7 min**" in text
    assert "Extrapolation (not a measurement)" in text


def test_profile_tables_keep_their_totals(tmp_path):
    header = ["---", "Name  Self CPU %", "---"]
    table = "\n".join(header + [f"op{i}  {i}%" for i in range(20)] + ["---", "Self CPU time total: 9.5ms"])
    doc = _scale_doc(1, 1000.0)
    doc["measurements"].append({"phase": "profile", "what": "one training step", "tables": {"by_self_cpu_time": table}})
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "perf.md"
    perf_table.main(["--out", str(out), str(path)])
    text = out.read_text()
    assert "op11  11%\nSelf CPU time total: 9.5ms\n```" in text  # 12 rows, then what they are percentages of
    assert "op12" not in text
