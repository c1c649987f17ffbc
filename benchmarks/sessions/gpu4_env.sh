# Sourced by the gpu4_*.sh parts: the environment every GPU command needs, the results folder, a timer.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=$(( $(nproc) / 2 ))
R=/tmp/s4/res; mkdir -p "$R"; T0=$(date +%s)
mark() { echo "$(date +%T) $PART: $(( $(date +%s) - T0 ))s $1" | tee -a "$R/timings.txt"; }
python -c "import deepspeed" 2>/dev/null ||
  python -m pip install -q --no-index --find-links .whl deepspeed hjson msgpack py-cpuinfo ninja pydantic > "$R/pip.log" 2>&1
