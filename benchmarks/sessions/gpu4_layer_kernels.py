"""GPU session 4: which non-matmul, non-attention kernels one Llama-2-7B decoder layer (HF, bf16, sdpa) runs at
64K tokens, forward + backward, on 1 GPU: the "other" 3.07 s of the 128K step profile, by kernel name."""
import collections
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
import sys; sys.path.insert(0, "benchmarks")
from profile_step import kind

cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=131072, attn_implementation="sdpa")
layer = LlamaDecoderLayer(cfg, 0).cuda().to(torch.bfloat16)
rope = LlamaRotaryEmbedding(cfg).cuda()
S = 65536
x = torch.randn(1, S, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
pos = torch.arange(S, device="cuda")[None]
def step():
    cos_sin = rope(x, pos)
    out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()
for _ in range(2):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    step(); torch.cuda.synchronize()
tot = collections.Counter(); n = collections.Counter()
for e in prof.events():
    if e.device_type != torch.autograd.DeviceType.CPU:
        tot[(kind(e.name), e.name[:110])] += e.time_range.elapsed_us(); n[(kind(e.name), e.name[:110])] += 1
bykind = collections.Counter()
for (k, _), v in tot.items():
    bykind[k] += v
print("per kind, ms:", {k: round(v / 1e3, 1) for k, v in bykind.most_common()})
for (k, name), v in tot.most_common(40):
    if k == "other":
        print(f"{v / 1e3:8.2f} ms {n[(k, name)]:4d}x {name}")
