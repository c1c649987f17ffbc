#!/usr/bin/env bash
# Issue 8, prepared in session 8 (not run: no device time left). One H200, about 3 minutes. Session 8's emulated
# 128K profile spent about 0.7 s of 20.74 s in layout copies and adds of [1, 32, S, 128] attention tensors
# (aten::copy_ 864 calls, aten::add/add_ 192). This names the lines they come from: a 2-layer Llama-2-7B-shape
# step at 128K as rank 0 of 2, profiled with Python stacks (profile_step.py --stacks).
#   bash benchmarks/sessions/gpu4_run.sh benchmarks/sessions/gpu13_copy_stacks.sh 300     (carry .whl)
PART=stacks; source benchmarks/sessions/gpu4_env.sh
python -m accelerate.commands.launch --config_file accelerate_configs/zero3.yaml --num_processes 1 \
  benchmarks/emulate_rank.py --world 2 -- benchmarks/profile_step.py --stacks --step 3 --out "$R/stacks.json" -- \
  --model shape:llama2-7b,num_hidden_layers=2 --dataset random --seq-length 131072 --backend zigzag_ring \
  --max-steps 3 --output-dir /tmp/stacks --no-save --keep-attention --fuse-pointwise > "$R/stacks.log" 2>&1
mark "copy stacks: exit $?"
python -c "
import json; d = json.load(open('$R/stacks.rank0.json'))
print('wall', round(d['wall_s'], 3), {k: round(v['sum_s'], 3) for k, v in d['kinds'].items()})
for r in d['op_stacks'][:15]:
    print(r['op'], round(r['self_s'], 4), r['count'], ' <- '.join(f.split('/')[-1] for f in r['stack'][:5]))"
