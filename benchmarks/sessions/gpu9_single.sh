#!/usr/bin/env bash
# Session 7, one H200 (the 2-GPU kind was not lent at the start). About 7 minutes:
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu9_single.sh 560   (carry .whl, output/baseline_4cccb24)
# 1. Session 6's cuDNN fix on GPU: the GPU tests (the single-process cuDNN graph-cache test among them; the 2-GPU
#    ones skip on one GPU).
# 2. Issue 8: the ring backward change (merge.RowSum, commit 9be12be) against the code before it (4cccb24, carried
#    as output/baseline_4cccb24), kernel + merge time of rank 0 of a 2-GPU 128K run, emulated on one GPU
#    (bench_attention --emulate-world 2: communication is a no-op). New, old, new, old in one call.
# 3. Issue 11: the same emulation for one rank of 8 GPUs at 128K and 512K, every backend.
PART=single; source benchmarks/sessions/gpu4_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$R/timings.txt"
python -m pytest -q -m gpu tests/ -rs > "$R/gpu_tests.log" 2>&1; mark "gpu tests: exit $?: $(tail -n 1 "$R/gpu_tests.log")"
grep -E "PASS|FAIL|SKIP|cudnn" "$R/gpu_tests.log" | cut -c1-200 | head -20 >> "$R/timings.txt"
AB="--emulate-world 2 --seqlens 131072 --kernels cudnn --backends zigzag_ring,ring,dist_flash --no-torch-cp --warmup 3 --iters 9"
for i in 1 2; do
  python benchmarks/bench_attention.py $AB --json "$R/ab_new_$i.json" > "$R/ab_new_$i.log" 2>&1
  mark "A/B new $i: exit $?: $(grep -E '^cudnn' "$R/ab_new_$i.log" | cut -c1-220)"
  ( cd output/baseline_4cccb24 && python benchmarks/bench_attention.py $AB --json "$R/ab_old_$i.json" ) > "$R/ab_old_$i.log" 2>&1
  mark "A/B old $i: exit $?: $(grep -E '^cudnn' "$R/ab_old_$i.log" | cut -c1-220)"
done
E8="--emulate-world 8 --kernels cudnn --backends zigzag_ring,ulysses,usp:4x2,usp:2x4,dist_flash --no-torch-cp --warmup 1 --iters 4"
python benchmarks/bench_attention.py $E8 --seqlens 131072 --json "$R/emulate8_128k.json" > "$R/emulate8_128k.log" 2>&1
mark "emulated P=8 128K: exit $?"; grep -E "^\| cudnn" "$R/emulate8_128k.log" | cut -c1-300 >> "$R/timings.txt"
python benchmarks/bench_attention.py $E8 --seqlens 524288 --skip-single --json "$R/emulate8_512k.json" > "$R/emulate8_512k.log" 2>&1
mark "emulated P=8 512K: exit $?"; grep -E "^\| cudnn" "$R/emulate8_512k.log" | cut -c1-300 >> "$R/timings.txt"
