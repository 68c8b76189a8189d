"""lm-evaluation-harness on a sparse expert directory, with no export: the model class `exert_ds` registered with
lm-eval is its HFLM given the model that storage/expert_model.py assembles from the rank files (sha256 and the
sparsity promise checked on the way), so lm-eval's own batching, truncation and scoring apply unchanged.

    python -m exert_ds.evaluation.lm_eval_model run --model exert_ds --model_args expert=runs/health-7b/expert \\
        --tasks my_task --include_path my_tasks/       # lm-eval's own CLI, with `exert_ds` registered
    exert-ds eval --model runs/health-7b/expert --lm-eval-tasks my_task --lm-eval-include my_tasks/ --out r.json

or from Python: `import exert_ds.evaluation.lm_eval_model` and then `lm_eval.simple_evaluate(model="exert_ds",
model_args="expert=PATH", tasks=[...])`. model_args: `expert` (required), `dtype` (default float32), `tokenizer`
(default the expert's), `sparse_kernels` (`2:4`: run the pruned projections on torch's semi-structured sparse
kernels, CUDA only), and HFLM's own (`max_length`, `add_bos_token`, ...). `device` defaults to CUDA when visible.
Needs `pip install 'exert_ds[lm-eval]'` (tested with lm-eval 0.4.13).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from exert_ds.config import ModelConfig
from exert_ds.errors import ConfigError
from exert_ds.model.loading import load_tokenizer
from exert_ds.storage.expert_model import load_expert_model
from exert_ds.storage.manifest import is_expert_dir

NAME = "exert_ds"


@register_model(NAME)
class ExpertLM(HFLM):
    """HFLM over a sparse expert directory (output_dir/expert), read one tensor at a time into one process."""

    def __init__(
        self,
        expert: str,
        dtype: str = "float32",
        tokenizer: str | None = None,
        device: str | None = None,
        sparse_kernels: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not is_expert_dir(expert):
            raise ConfigError(f"model_args expert={expert}: not an exert-ds expert directory (no expert_manifest.json)")
        cfg = ModelConfig(expert, dtype=dtype, tokenizer=tokenizer)
        model, _, self.promised_sparsity = load_expert_model(cfg, None)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device).eval()
        self._kernels = contextlib.ExitStack()
        if sparse_kernels:
            from exert_ds.evaluation.sparse_kernels import check_request, semi_structured_weights

            check_request(sparse_kernels, None)
            self._kernels.enter_context(semi_structured_weights(model))
        super().__init__(pretrained=model, tokenizer=load_tokenizer(cfg), **kwargs)


def lm_eval_results(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    include_path: str | None,
    batch_size: int,
    max_length: int,
    limit: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of `tasks` (lm-eval task names, or tasks under `include_path`) on the model
    `exert-ds eval` already loaded, in one process; lm-eval's `results` (and `samples` with `log_samples`)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or under --lm-eval-include {include_path}" if include_path else ""
        raise ConfigError(f"--lm-eval-tasks: {', '.join(unknown)} is not an lm-eval task{where}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples)
    keep = {"results": out["results"], "versions": out.get("versions", {}), "n-samples": out.get("n-samples", {})}
    if log_samples:
        keep["samples"] = out["samples"]
    return keep


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
