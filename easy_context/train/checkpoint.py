"""Crash-safe training checkpoints and final models: written under a temporary name, renamed when complete.

Layout under the output directory: ``checkpoints/step_<N>/`` (accelerate ``save_state``: DeepSpeed ZeRO
shards of model and optimizer, RNG states, plus ``trainer_state.json`` written last) and ``model/`` (the
final Hugging Face model). A kill at any moment leaves at most a ``*.tmp`` directory, which is never
picked for resume and is removed by the next save; the previous checkpoint stays usable. For multi-node
runs the output directory must be on a filesystem all nodes share (as DeepSpeed checkpoints need anyway).

Trust: every checkpoint carries ``sha256_manifest.json`` (the digest of each of its files, written before
the rename); a resume checks every file against it before anything loads (a damaged newest checkpoint gives
way to the previous one), and loads DeepSpeed's shards as data only (``safe_torch_load``), so a checkpoint
that was tampered with cannot run code even with its manifest rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from ..hf.lora import save_lora_model
from .distributed import main_decides
from .run_log import log_path

STATE = "trainer_state.json"
MANIFEST = "sha256_manifest.json"
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


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: damaged, altered since it was written, or holding code."""


def _files(path: str) -> list[str]:
    """Every file under ``path`` but the manifest, relative, sorted."""
    found = []
    for root, _, names in os.walk(path):
        found += [os.path.relpath(os.path.join(root, n), path) for n in names]
    return sorted(f for f in found if f != MANIFEST)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)  # releases the GIL: the threads below hash files in parallel
    return h.hexdigest()


def _digests(path: str, files: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(files, pool.map(lambda f: _sha256(os.path.join(path, f)), files)))


def write_manifest(path: str) -> None:
    """Record the sha256 of every file of the checkpoint directory ``path`` in its manifest (what a resume
    checks); by hand, only for a checkpoint you trust that has none (written before manifests existed)."""
    _write_json(os.path.join(path, MANIFEST), {"sha256": _digests(path, _files(path))})


def verify_checkpoint(path: str) -> None:
    """CheckpointError unless every file under ``path`` is listed in its manifest with the same sha256."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            recorded = json.load(f)["sha256"]
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no {MANIFEST}, so its files cannot be checked (checkpoints written before digests were "
            "recorded have none). If you trust it, record them: python3 -c \"from easy_context import "
            f"checkpoint; checkpoint.write_manifest('{path}')\"") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: its {MANIFEST} is unreadable ({e})") from None
    files = _files(path)
    extra, missing = sorted(set(files) - set(recorded)), sorted(set(recorded) - set(files))
    if extra:
        raise CheckpointError(f"{path}: {', '.join(extra)} not in the manifest (added after the checkpoint was "
                              "written)")
    if missing:
        raise CheckpointError(f"{path}: {', '.join(missing)} listed in the manifest but missing")
    digests = _digests(path, files)
    changed = [f for f in files if digests[f] != recorded[f]]
    if changed:
        raise CheckpointError(f"{path}: {', '.join(changed)}: sha256 digest differs from the one recorded when "
                              "the checkpoint was written (damaged or replaced)")


def resume_point(output_dir: str, resume: bool, resume_from: str | None = None, main: bool = True) -> str | None:
    """Collective (the main process checks): the checkpoint a run into ``output_dir`` starts from, None for a
    fresh run. ``resume``: the newest checkpoint whose files verify (older ones stand in for a damaged newest,
    with a warning; none in a directory no run trained in yet); ``resume_from``: that one (``step_N`` or a path).
    SystemExit, before anything loads, for a run that must not start: a finished model there (never
    overwritten), a run that left no checkpoint to resume, a fresh run into a directory holding checkpoints."""
    return main_decides(lambda: _resume_point(output_dir, resume, resume_from), main)


def _resume_point(output_dir: str, resume: bool, resume_from: str | None) -> str | None:
    found = complete_checkpoints(output_dir)
    model = os.path.join(output_dir, "model")
    if os.path.exists(model):
        hint = (f"; to go on from one of its checkpoints, pass --resume-from {found[-1][1]} with a new --output-dir"
                if found else "")
        raise SystemExit(f"{output_dir} already holds a run that finished: its model {model} is never overwritten. "
                         f"Choose another --output-dir (--model {model} trains on from it){hint}; --resume "
                         "continues only an unfinished run")
    if resume_from:
        named = os.path.join(checkpoint_root(output_dir), resume_from)
        path = named if _STEP.match(resume_from) else resume_from
        if not os.path.exists(os.path.join(path, STATE)):
            names = ", ".join(os.path.basename(p) for _, p in found) or "none"
            raise SystemExit(f"--resume-from {resume_from}: {path} is not a complete checkpoint (complete ones in "
                             f"{checkpoint_root(output_dir)}: {names})")
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            raise SystemExit(f"--resume-from {resume_from}: {e}") from None
        return path
    if not resume:
        if found:
            raise SystemExit(f"{output_dir} already holds a run: pass --resume to continue it or choose another "
                             "--output-dir")
        return None
    if not found:
        log = log_path(output_dir)
        if os.path.exists(log) and os.path.getsize(log):  # a run trained here: starting over would replace it
            raise SystemExit(f"--resume: {output_dir} holds a run ({log}) but no complete checkpoint to resume from "
                             "(a run writes them with --checkpoint-every N, and when SIGINT or SIGTERM stops it); "
                             "drop --resume to start that run over, or choose another --output-dir")
        print(f"--resume: nothing to resume in {output_dir}: a new run starts", file=sys.stderr, flush=True)
        return None  # the scripts pass --resume to their first launch too
    skipped = []
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if skipped:
            print(f"warning: resuming from {path}, not from newer checkpoints that fail their digest check: "
                  + "; ".join(skipped), file=sys.stderr, flush=True)
        return path
    raise SystemExit(f"--resume: no checkpoint under {checkpoint_root(output_dir)} passes its digest check: "
                     + "; ".join(skipped))


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
        write_manifest(tmp)  # last: it covers every file, the trainer state included
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    _barrier()
    return final


def safe_torch_load(path: str, map_location=None):
    """``torch.load`` of data only: tensors, containers, numbers and strings, plus the loss-scaler and ZeRO-stage
    records DeepSpeed's optimizer states hold; CheckpointError for a file that names anything else to call."""
    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum]
    except ImportError:
        pass
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line for line in str(e).splitlines() if "WeightsUnpickler error" in line), "not plain data")
        raise CheckpointError(f"refusing to load {path}: it holds more than tensors and plain data "
                              f"({why})") from None


def load_checkpoint(accelerator, path: str) -> dict:
    """Collective: restore the training state saved at ``path`` (check it first: ``resume_point`` does);
    returns the trainer's counters. DeepSpeed's shards load as data only (its own loader unpickles anything)."""
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    for model in getattr(accelerator, "_models", []):
        engine = getattr(model, "checkpoint_engine", None)  # a DeepSpeed engine's; accelerate's own loads are safe
        if engine is not None:
            engine.load = lambda file, map_location=None: safe_torch_load(file, map_location)
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
