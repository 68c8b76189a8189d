# Sourced at the start of a device call (nvidia-h200*): installs the wheels of ../shared/tools/gpu-wheels.sh
# (carried as .whl/) when deepspeed is missing, and sets the environment every GPU run here uses.
#   run(kind="nvidia-h200-x2", carry=[".whl", ...], command="source eval/gpu_setup.sh && ...")
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=8
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
