"""The one multiprocessing forkserver every multi-process test forks from: it imports torch, transformers,
DeepSpeed and the package once, so that a test's processes start with them loaded instead of importing them again
(most of a short multi-process test's time). The server never runs torch work, so forking it is safe."""

from __future__ import annotations

import multiprocessing

PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama",
           "transformers.models.qwen2.modeling_qwen2", "transformers.models.mistral.modeling_mistral",
           "accelerate", "deepspeed", "easy_context.hf.attention", "easy_context.hf.causal_lm",
           "easy_context.parallel.loss", "easy_context.train.loop", "easy_context.train.prepare",
           "easy_context.train.checkpoint", "easy_context.world.default", "tests.helpers.reference",
           "tests.helpers.tiny_models"]
multiprocessing.set_forkserver_preload(PRELOAD)
CONTEXT = multiprocessing.get_context("forkserver")
