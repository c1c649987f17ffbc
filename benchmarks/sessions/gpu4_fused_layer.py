"""GPU session 4: one Llama-2-7B decoder layer (HF, bf16, sdpa) at 64K tokens on 1 GPU, forward + backward, eager vs
the layer's pointwise parts compiled (torch.compile of RMSNorm, RoPE, SiLU*mul; matmuls and attention untouched):
step time and GPU time by kind. Tells what fusing the "other" kernels could save in the 128K step."""
import collections, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as ml
sys.path.insert(0, "benchmarks")
from profile_step import kind

cfg = ml.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=131072, attn_implementation="sdpa")
S = 65536


@torch.compile(fullgraph=True)
def rms_norm(x, w, eps: float):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@torch.compile(fullgraph=True)
def silu_mul(g, u):
    return torch.nn.functional.silu(g) * u


@torch.compile(fullgraph=True)
def rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def measure(fused: bool):
    torch.manual_seed(0)
    layer = ml.LlamaDecoderLayer(cfg, 0).cuda().to(torch.bfloat16)
    rot = ml.LlamaRotaryEmbedding(cfg).cuda()
    if fused:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = (lambda n: lambda x: rms_norm(x, n.weight, n.variance_epsilon))(norm)
        mlp = layer.mlp
        mlp.forward = lambda x: mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
        ml.apply_rotary_pos_emb = lambda q, k, cos, sin, *a, **kw: rope(q, k, cos, sin)
    x = torch.randn(1, S, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(S, device="cuda")[None]
    def step():
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rot(x, pos))
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
    for _ in range(3):
        step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize(); ms = (time.perf_counter() - t) / 5 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(); torch.cuda.synchronize()
    by = collections.Counter()
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            by[kind(e.name)] += e.time_range.elapsed_us() / 1e3
    out = x.grad.detach().clone(); x.grad = None
    return ms, {k: round(v, 1) for k, v in by.most_common()}, out


orig = ml.apply_rotary_pos_emb
eager = measure(False)
fused = measure(True)
ml.apply_rotary_pos_emb = orig
print(f"eager: {eager[0]:.1f} ms/step, GPU ms by kind {eager[1]}")
print(f"fused: {fused[0]:.1f} ms/step, GPU ms by kind {fused[1]}")
print(f"input-gradient relative difference (bf16): {(fused[2] - eager[2]).float().norm() / eager[2].float().norm():.2e}")
