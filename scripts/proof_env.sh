# Settings shared by the RULER-style proof (sourced by proof_stage1.sh, proof_extend.sh, proof_eval.sh; every one
# can be overridden from the environment). The story, on GPUs, with nothing downloaded:
#   1. proof_stage1.sh: a 26M-parameter Llama trained from scratch at SHORT tokens (a length curriculum up to it) on
#      real text (the Python standard library's docs, train part) mixed with the task generators of eval_ruler.py;
#   2. proof_extend.sh: the same model extended to LONG = 16-64 x SHORT by a sequence-parallel fine-tune (zigzag ring
#      over the GPUs, YaRN by LONG/SHORT) on the same mixture at longer lengths;
#   3. proof_eval.sh: the task suite and perplexity on held-out real text, up to LONG, for the stage-1 model as is,
#      three no-training baselines (raised RoPE theta, YaRN, dynamic NTK) and the extended model; then the
#      comparison (eval_ruler.py --compare).
#     bash scripts/proof_stage1.sh && bash scripts/proof_extend.sh && bash scripts/proof_eval.sh
# Outputs and timings go to $OUT; a step whose output exists is skipped (rerun after a failure to resume).
# train.py runs unfused here (--no-fuse-pointwise), as the documented runs did: on a fresh machine the fused kernels'
# first compile would take a share of stages capped at a few minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TOKENIZERS_PARALLELISM=false
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC=${NPROC:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
else
  NPROC=${NPROC:-2}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
OUT=${OUT:-output/proof_ruler}
PRESET=${PRESET:-small}             # world/default.py: "small" is the 26M-parameter Llama
SHORT=${SHORT:-2048}                # stage 1's training length
LONG=${LONG:-131072}                # the extension's target: 64 x SHORT (32768: 16 x, 65536: 32 x)
FACTOR=$(( LONG / SHORT ))
TEXT=${TEXT:-pydoc}                 # the real text: pydoc, or a folder of .txt files
TASKS=${TASKS:-"needle multikey multivalue multiquery vt cwe fwe"}
WEIGHTS=${WEIGHTS:-}                # how often each task's rows come, e.g. "multikey=3 cwe=3" (a task not named: 1)
DATA_PROCS=${DATA_PROCS:-$(nproc)}  # processes that write the training rows
PORT=${PORT:-29500}                 # the launcher's port: give each of several runs at once its own
LAUNCH=(accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes "$NPROC"
        --main_process_port "$PORT")
mkdir -p "$OUT"
T0=$(date +%s)
mark() { echo "$(( $(date +%s) - T0 ))s $1" | tee -a "$OUT/timings.txt"; }

# rows LENGTH COUNT: the folder of COUNT training rows of LENGTH tokens (task samples drawn by WEIGHTS over the
# train part of the text, 20% plain text rows; loss on the answers and 5% of the other tokens), written once,
# tokenized as $OUT/init. With WEIGHTS set, give each run its own OUT: the folders are named by length and count.
rows() {
  local dir="$OUT/data/rows_$1_$2"
  [ -d "$dir" ] || python3 -c "from easy_context.eval.task_mixture import write_mixture
weights = {k: float(v) for k, v in (w.split('=') for w in '$WEIGHTS'.split())}
write_mixture('$dir', '$OUT/init', $1, $2, tasks='$TASKS'.split(), source='$TEXT', split='train',
              num_proc=$DATA_PROCS, weights=weights or None)" >&2
  echo "$dir"
}
