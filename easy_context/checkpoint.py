"""Crash-safe training checkpoints and final models: written under a temporary name, renamed when complete.

Layout under the output directory: ``checkpoints/step_<N>/`` (accelerate ``save_state``: DeepSpeed ZeRO
shards of model and optimizer, RNG states, plus ``trainer_state.json`` written last) and ``model/`` (the
final Hugging Face model). A kill at any moment leaves at most a ``*.tmp`` directory, which is never
picked for resume and is removed by the next save; the previous checkpoint stays usable. For multi-node
runs the output directory must be on a filesystem all nodes share (as DeepSpeed checkpoints need anyway).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

STATE = "trainer_state.json"
_STEP = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under ``output_dir``, oldest first."""
    root = checkpoint_root(output_dir)
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = _STEP.match(name)
        if m and os.path.exists(os.path.join(root, name, STATE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint's path, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, keep: int = 2) -> str:
    """Collective: save the full training state at ``step`` (``state``: the trainer's own counters, JSON) to
    ``checkpoints/step_<step>`` via a temporary directory; keep the newest ``keep`` complete ones."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step_{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name))
    _barrier()
    accelerator.save_state(tmp)
    _barrier()
    if accelerator.is_main_process:
        _write_json(os.path.join(tmp, STATE), {**state, "step": step})
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    _barrier()
    return final


def load_checkpoint(accelerator, path: str) -> dict:
    """Collective: restore the training state saved at ``path``; returns the trainer's counters."""
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    accelerator.load_state(path)
    return state


def save_model(accelerator, model, tokenizer, output_dir: str, prefix: str = "model.", merge_lora: bool = True) -> str:
    """Collective: write the consolidated Hugging Face model (ZeRO-3 shards gathered; ``prefix`` stripped from
    the wrapper's state-dict keys; a LoRA+ model merged, or its adapter kept with ``merge_lora=False``) and
    tokenizer to ``output_dir/model`` via a temporary directory."""
    state_dict = accelerator.get_state_dict(model)  # every rank must call it under ZeRO-3
    final = os.path.join(output_dir, "model")
    if accelerator.is_main_process:
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model = accelerator.unwrap_model(model)
        hf_model = getattr(hf_model, "model", hf_model)
        if any(".lora_" in k for k in state_dict):
            from .lora import save_lora_model

            save_lora_model(hf_model, tmp, merge=merge_lora, state_dict=state_dict)
        else:
            state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
            hf_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(final):
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    _barrier()
    return final


def trim_log(path: str, step: int) -> None:
    """Keep only the JSONL records of steps <= ``step`` (what a killed run logged past its checkpoint goes)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
