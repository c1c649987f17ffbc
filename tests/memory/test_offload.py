"""Offloaded checkpointing: with each checkpointed layer's saved input moved to host memory and back, the loss and
every parameter gradient are bitwise those of plain gradient checkpointing (also with every_n_layers, with the
tiled MLP, under 2-process sequence parallelism and, opt-in, under DeepSpeed ZeRO-3); after forward the model
no longer holds the layer inputs it computed; backward finds each layer's input already fetched, but the first."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

from tests.helpers import zero3
from tests.helpers.distributed import run_distributed
from easy_context.hf.attention import apply_seq_parallel_monkey_patch
from easy_context.hf.causal_lm import causal_lm_loss
from easy_context.parallel.inputs import prepare_seq_parallel_inputs
from easy_context.memory.offload import (OffloadedCheckpoint, _Offloaded, check_host_memory, check_layer_counts,
                                  enable_offloaded_checkpointing, offloaded_input_host_bytes, offloaded_inputs,
                                  pinned_bytes, setup_checkpointing, skip_checkpointing)
from easy_context.memory.tiled_mlp import apply_tiled_mlp
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import batch, tiny_model

SEQ = 37
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                     reason="needs a CUDA GPU")])]


def _checkpointed(family: str, seed: int, offload: bool, device: str = "cpu", every_n_layers: int = 1, **overrides):
    """A tiny model in training mode with plain (offload=False) or offloaded gradient checkpointing."""
    model = tiny_model(family, seed, **overrides).to(device)
    if offload:
        assert isinstance(enable_offloaded_checkpointing(model, every_n_layers=every_n_layers), OffloadedCheckpoint)
    else:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(**({} if every_n_layers == 1 else {"every_n_layers": every_n_layers}))
    return model.train()


def _loss_and_grads(model, ids, labels):
    loss = model(input_ids=ids.to(model.device), labels=labels.to(model.device)).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_equal(got, ref, what: str) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert torch.equal(loss, ref_loss), f"{what}: loss {loss} != {ref_loss}"
    for n, g in ref_grads.items():
        assert torch.equal(grads[n], g), f"{what}: gradient of {n} off by {rel_err(grads[n], g):.1e}"


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied and tied embeddings
def test_offload_equals_plain_checkpointing(family, seed):
    ids, labels = batch(seed, 2, SEQ)
    ref = _loss_and_grads(_checkpointed(family, seed, offload=False), ids, labels)
    _assert_equal(_loss_and_grads(_checkpointed(family, seed, offload=True), ids, labels), ref, family)


def test_every_n_layers_equals_plain_checkpointing(seed):
    ids, labels = batch(seed, 2, SEQ)
    ref = _loss_and_grads(_checkpointed("llama", seed, False, every_n_layers=2, num_hidden_layers=3), ids, labels)
    got = _loss_and_grads(_checkpointed("llama", seed, True, every_n_layers=2, num_hidden_layers=3), ids, labels)
    _assert_equal(got, ref, "every_n_layers=2")


def test_offload_composes_with_tiled_mlp(seed):
    ids, labels = batch(seed, 2, SEQ)
    ref = _loss_and_grads(_checkpointed("qwen2", seed, offload=False), ids, labels)
    model = _checkpointed("qwen2", seed, offload=True)
    apply_tiled_mlp(model, tile_tokens=10)
    loss, grads = _loss_and_grads(model, ids, labels)
    assert rel_err(loss, ref[0]) < 3e-6  # the tiled MLP's own tolerance (see test_tiled_mlp)
    for n, g in ref[1].items():
        assert rel_err(grads[n], g) < 3e-6, n


def _layer_inputs(model) -> list[weakref.ref]:
    """Weak references to the hidden states each decoder layer is called with, filled in as forward runs."""
    refs = []

    def record(module, args, kwargs):
        refs.append(weakref.ref(args[0] if args else kwargs["hidden_states"]))

    for layer in model.model.layers:
        layer.register_forward_pre_hook(record, with_kwargs=True)
    return refs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offload, every_n_layers", [(False, 1), (True, 1), (True, 2)])
def test_layer_inputs_are_released_after_forward(device, offload, every_n_layers, seed):
    layers = 4
    model = _checkpointed("llama", seed, offload, device, every_n_layers, num_hidden_layers=layers)
    refs = _layer_inputs(model)
    ids, labels = batch(seed, 2, SEQ)
    loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
    alive = [r() is not None for r in refs]
    # Plain checkpointing keeps every layer's input for the recompute; offloaded, the checkpointed layers' inputs
    # exist only as host copies; layers left out by every_n_layers keep theirs inside their own graph.
    assert alive == [not offload or i % every_n_layers != 0 for i in range(layers)]
    loss.backward()


def _spy(func: OffloadedCheckpoint) -> tuple[list, list]:
    """Record what ``func`` packs (forward order) and, per unpack in backward, (its checkpointed call, whether
    its copy back had already been started)."""
    packed, unpacked = [], []
    pack, unpack = func._pack, func._unpack

    def spy_pack(t):
        saved = pack(t)
        if isinstance(saved, _Offloaded):  # not a parameter
            packed.append(saved)
        return saved

    def spy_unpack(saved):
        if isinstance(saved, _Offloaded):
            unpacked.append((saved.call, saved.on_device is not None))
        return unpack(saved)

    func._pack, func._unpack = spy_pack, spy_unpack
    return packed, unpacked


def _assert_prefetched(packed: list, unpacked: list, calls: int, device: str) -> None:
    assert sorted({s.call for s in packed}) == list(range(1, calls + 1))
    assert all(s.host.device.type == "cpu" and (device == "cpu" or s.host.is_pinned()) for s in packed)
    assert len(unpacked) == len(packed)
    assert [c for c, _ in unpacked] == sorted((c for c, _ in unpacked), reverse=True)  # last layer first
    assert [on for _, on in unpacked] == [False] + [True] * (len(unpacked) - 1)  # all but the first prefetched
    assert all(s.on_device is None for s in packed)  # nothing left on the device once backward used it


@pytest.mark.parametrize("device", DEVICES)
def test_backward_prefetches_each_layer_input(device, seed):
    layers = 4
    model = _checkpointed("llama", seed, True, device, num_hidden_layers=layers)
    packed, unpacked = _spy(model.model.layers[0]._gradient_checkpointing_func)
    ids, labels = batch(seed, 1, SEQ)
    model(input_ids=ids.to(device), labels=labels.to(device)).loss.backward()
    hidden = (1, SEQ, model.config.hidden_size)
    assert [sum(s.call == c and tuple(s.host.shape) == hidden for s in packed) for c in range(1, layers + 1)] == [1] * layers
    _assert_prefetched(packed, unpacked, layers, device)


@pytest.mark.parametrize("device", DEVICES)
def test_all_inputs_of_a_call_come_back_together(device, seed):
    # A layer may get several tensor inputs (which ones depends on the transformers version): backward fetches
    # them as one, and prefetches all of the layer before.
    g = torch.Generator().manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(8, 8, generator=g).to(device)) for _ in range(3)]
    scale = torch.rand(5, 8, generator=g).to(device)

    def layer(h, s, w):
        return torch.tanh(h @ w) * s

    def run(func):
        h = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed)).to(device).requires_grad_()
        out = h
        for w in weights:
            out = func(layer, out, scale + 0, w)
        out.square().sum().backward()
        return [w.grad.clone() for w in weights] + [h.grad]

    expected = run(lambda f, *a: f(*a))
    for w in weights:
        w.grad = None
    func = OffloadedCheckpoint()
    packed, unpacked = _spy(func)
    got = run(func)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert len(packed) == 2 * len(weights)  # h and s per call (parameters are never offloaded)
    _assert_prefetched(packed, unpacked, len(weights), device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_frees_device_memory_cuda(seed):
    layers, seq, hidden = 4, 8192, 256
    ids = torch.randint(128, (1, seq), generator=torch.Generator().manual_seed(seed))
    results, after_forward = [], []
    for offload in (False, True):
        model = _checkpointed("llama", seed, offload, "cuda", num_hidden_layers=layers, hidden_size=hidden,
                              intermediate_size=512, head_dim=64)
        torch.cuda.synchronize()
        loss = model(input_ids=ids.cuda(), labels=ids.cuda()).loss
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # let the allocator retire blocks whose side-stream copies are done
        after_forward.append(torch.cuda.memory_allocated())
        loss.backward()
        results.append((loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}))
        del model, loss
        gc.collect()
        torch.cuda.empty_cache()
    saved_inputs = layers * seq * hidden * 4
    assert after_forward[0] - after_forward[1] >= 0.9 * saved_inputs, after_forward
    (loss, grads), (ref_loss, ref_grads) = results[1], results[0]
    assert rel_err(loss, ref_loss) < 1e-6
    for n, g in ref_grads.items():
        assert rel_err(grads[n], g) < 1e-5, n


def test_contract():
    with pytest.raises(ValueError, match="non-reentrant"):
        OffloadedCheckpoint(use_reentrant=True)
    with pytest.raises(ValueError, match="non-reentrant"):
        OffloadedCheckpoint()(lambda x: x, torch.ones(1), use_reentrant=True)
    model = tiny_model("llama", 0)
    func = enable_offloaded_checkpointing(model)
    assert all(layer._gradient_checkpointing_func is func and layer.gradient_checkpointing
               for layer in model.model.layers)
    x = torch.randn(3, 4, requires_grad=True)
    OffloadedCheckpoint(preserve_rng_state=False)(torch.sin, x).sum().backward()  # usable on its own
    assert torch.equal(x.grad, torch.cos(x.detach()))


def _sp_worker(rank, world, seed):
    ids, labels = batch(seed, 2, 40)
    for family in ("llama", "qwen2"):
        results = []
        for offload in (False, True):
            model = apply_seq_parallel_monkey_patch("zigzag_ring", _checkpointed(family, seed, offload))
            inp = prepare_seq_parallel_inputs("zigzag_ring", ids, labels)
            out = causal_lm_loss(model, inp.input_ids, inp.target_ids, inp.position_ids)
            out.loss.backward()  # the recompute runs the ring attention (its collectives) again
            results.append((out.value, {n: p.grad for n, p in model.named_parameters()}))
        _assert_equal(results[1], results[0], f"{family}/zigzag_ring rank {rank}")


def test_offload_under_sequence_parallelism(seed):
    run_distributed(_sp_worker, 2, seed)


def _zero3_worker(rank, world, seed):
    zero3.init(rank, world)
    ids, labels = batch(seed + rank, 1, SEQ)
    results = [zero3.loss_and_grads(_checkpointed("llama", seed, offload), ids, labels) for offload in (False, True)]
    _assert_equal(results[1], results[0], f"ZeRO-3 rank {rank}")


@pytest.mark.skipif(not os.environ.get("EASY_CONTEXT_TEST_DEEPSPEED"),
                    reason="opt-in (~40 s on 2 cores): set EASY_CONTEXT_TEST_DEEPSPEED=1 (needs deepspeed)")
def test_offload_under_deepspeed_zero3(seed):
    # Parameters are empty placeholders outside module calls: the recompute must gather them through module
    # hooks, and the saved-tensor hooks must leave them alone.
    pytest.importorskip("deepspeed")
    run_distributed(_zero3_worker, 2, seed)


@pytest.mark.parametrize("offloaded_layers", [0, 2, 4])
def test_only_the_first_n_layers_are_offloaded(offloaded_layers, seed):
    layers = 4
    model = tiny_model("llama", seed, num_hidden_layers=layers)
    enable_offloaded_checkpointing(model, layers=offloaded_layers)
    model.train()
    refs = _layer_inputs(model)
    ids, labels = batch(seed, 2, SEQ)
    loss = model(input_ids=ids, labels=labels).loss
    # The first N layers' inputs wait on the host; the others stay on the device for their recompute.
    assert [r() is not None for r in refs] == [i >= offloaded_layers for i in range(layers)]
    got = (loss.detach(), _grads_after(loss, model))
    ref_model = _checkpointed("llama", seed, False, num_hidden_layers=layers)
    _assert_equal(got, _loss_and_grads(ref_model, ids, labels), f"layers={offloaded_layers}")


def _grads_after(loss, model):
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _count_layer_calls(model) -> list[int]:
    """Forward calls per decoder layer (a checkpointed layer runs twice: forward and recompute), counted at its
    MLP: transformers >= 5.2x checkpoints the layer's ``forward``, so hooks on the layer itself run once."""
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("offload,skip_last", [(0, 0), (0, 2), (-1, 1), (2, 4), (0, -1)])
def test_setup_checkpointing_skips_the_last_layers_exactly(offload, skip_last, seed):
    layers = 4
    model = tiny_model("llama", seed, num_hidden_layers=layers)
    setup_checkpointing(model, offload=offload, skip_last=skip_last)
    model.train()
    calls = _count_layer_calls(model)
    ids, labels = batch(seed, 2, SEQ)
    got = _loss_and_grads(model, ids, labels)
    # Layers with checkpointing run forward twice (the recompute), the last `skip_last` (or all for -1) once.
    plain = 0 if skip_last < 0 else layers - skip_last
    assert calls == [2] * plain + [1] * (layers - plain)
    _assert_equal(got, _loss_and_grads(_checkpointed("llama", seed, False, num_hidden_layers=layers), ids, labels),
                  f"offload={offload} skip_last={skip_last}")


def test_layer_counts_are_checked_before_the_model_loads():
    check_layer_counts(32, offload=28, skip_last=4)
    with pytest.raises(ValueError, match="at most 32"):
        check_layer_counts(32, offload=33)
    with pytest.raises(ValueError, match="at most 32"):
        check_layer_counts(32, skip_last=40)
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        check_layer_counts(32, offload=-1, skip_last=-1)
    with pytest.raises(ValueError, match="cannot skip 5"):
        skip_checkpointing(_checkpointed("llama", 0, False, num_hidden_layers=4), 5)


def test_offload_that_cannot_fit_host_memory_is_refused_with_the_layers_that_would():
    gib = 2 ** 30
    assert pinned_bytes(4 * gib) == 4 * gib and pinned_bytes(int(2.67 * gib)) == 4 * gib
    # the measured 1M-token 2-GPU run: 28 inputs of 4 GiB on each of 2 processes, 251 GiB host: fits
    check_host_memory(28, 4 * gib, 2, available=251 * gib)
    with pytest.raises(ValueError, match=r"need 256.0 GiB of host memory, and 251.0 GiB are available: offload "
                                         r"at most 31 layers"):
        check_host_memory(32, 4 * gib, 2, available=251 * gib)
    # 350K local tokens x 4096 x 2 bytes = 2.67 GiB, pinned as 4 GiB: the rounding is what does not fit
    with pytest.raises(ValueError, match=r"pinned as 4.00 GiB"):
        check_host_memory(32, 350 * 1024 * 4096 * 2, 1, available=100 * gib)


def test_zero3_offload_needs_4_bytes_a_parameter_plus_16_per_offloaded_optimizer_share_plus_2_for_the_weights():
    from easy_context.memory.offload import zero_offload_host_bytes

    # DeepSpeed's fp32 gradient buffer covers every parameter (4 bytes) whatever the ratio; the offloaded share
    # adds fp32 gradients, fp32 weights and Adam's two moments (16 bytes); offloaded bf16 weights 2 more
    both = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    assert zero_offload_host_bytes(both, 1000) == 22_000
    assert zero_offload_host_bytes({"offload_optimizer": {"device": "cpu"}}, 1000) == 20_000
    assert zero_offload_host_bytes({"offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "none"}},
                                   1000) == 2_000
    assert zero_offload_host_bytes({}, 1000) == 0
    assert zero_offload_host_bytes(both, 1000, lora=True) == 2_000  # adapters' optimizer states are negligible
    part = {"offload_optimizer": {"device": "cpu", "ratio": 0.25}}  # ZeRO-Offload++: a quarter on the CPU
    assert zero_offload_host_bytes(part, 1000) == 8_000
    # measured on one H200 (docs/performance.md): Llama-3-8B shape at ratio 0.5, peak host RSS 97.5 GiB
    half = {"offload_optimizer": {"device": "cpu", "ratio": 0.5}}
    assert 85 < zero_offload_host_bytes(half, 8_030_261_248) / 2**30 < 97.5


@pytest.fixture
def one_process(monkeypatch):
    """This machine runs the only process of the job (ZeRO-3's host share is all of the state)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    return monkeypatch


def test_an_8b_model_fully_offloaded_is_refused_before_loading_on_a_128_gib_host(one_process):
    from easy_context.memory.offload import check_zero_offload_host

    config = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}
    with pytest.raises(ValueError, match=r"8\.03B parameters.*164\.5 GiB.*120\.0 GiB are available.*--lora-rank"):
        check_zero_offload_host(config, 8_030_261_248, available=120 * 2**30)
    check_zero_offload_host(config, 8_030_261_248, lora=True, available=120 * 2**30)  # LoRA: 15 GiB of weights
    check_zero_offload_host(None, 8_030_261_248, available=1)  # no DeepSpeed: nothing offloaded
    one_process.setenv("WORLD_SIZE", "2")  # two machines of one GPU each: this host holds half
    check_zero_offload_host(config, 8_030_261_248, available=83 * 2**30)


def test_zero3_states_and_offloaded_activations_share_one_host_budget(one_process):
    from easy_context.memory.offload import check_zero_offload_host

    gib = 2 ** 30
    half = {"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 0.5}}}  # 89.7 GiB at 8.03B
    check_zero_offload_host(half, 8_030_261_248, available=100 * gib)  # fits alone
    check_host_memory(16, 2 * gib, 1, available=100 * gib)  # 16 offloaded layer inputs of 2 GiB fit alone too
    # together they do not: the message names both tenants and the largest ratio that leaves room for the inputs
    with pytest.raises(ValueError, match=r"121\.7 GiB.*32\.0 GiB of offloaded activations.*100\.0 GiB are "
                                         r"available.*\"ratio\" at most 0\.31"):
        check_zero_offload_host(half, 8_030_261_248, activations=32 * gib, available=100 * gib)


def test_the_refusal_names_the_optimizer_ratio_that_fits(one_process):
    from easy_context.memory.offload import check_zero_offload_host

    both = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}
    # offloaded weights (15.0 GiB) and the gradient buffer (29.9) leave 75.1 of 120 GiB for 119.6 GiB: ratio 0.62
    with pytest.raises(ValueError, match=r"\"ratio\" at most 0\.62"):
        check_zero_offload_host(both, 8_030_261_248, available=120 * 2**30)
    # weights alone overflow the host: no ratio helps, and the message does not offer one
    with pytest.raises(ValueError) as refused:
        check_zero_offload_host(both, 8_030_261_248, available=10 * 2**30)
    assert "at most" not in str(refused.value)


def test_offloaded_inputs_count_one_per_group_of_the_offloaded_layers():
    assert offloaded_inputs(32, 0) == 0
    assert offloaded_inputs(32, -1) == 32 and offloaded_inputs(32, 20) == 20
    assert offloaded_inputs(32, -1, 2) == 16 and offloaded_inputs(32, 20, 4) == 5
    # layers left uncheckpointed (--no-gradient-checkpointing 4) save no input to offload
    assert offloaded_inputs(32, -1, skip_last=4) == 28 and offloaded_inputs(32, 30, skip_last=4) == 28
    assert offloaded_inputs(32, 20, skip_last=4) == 20 and offloaded_inputs(32, -1, 2, skip_last=4) == 14
    assert offloaded_input_host_bytes(32, -1, 1, 3 << 20, skip_last=4) == (28 << 22 if torch.cuda.is_available() else 0)
