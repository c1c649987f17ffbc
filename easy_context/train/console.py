"""What a launched training process prints besides its own lines: each distinct library warning once (on the main
process; the other processes leave out the library deprecations the main one shows), and one line before
DeepSpeed spends minutes compiling an op.

Why Python's own once-per-location rule is not enough: it forgets what it showed whenever the warning filters
change, and DeepSpeed's CPU accelerator runs ``numactl`` (a subprocess: ``os.get_exec_path`` changes the filters
for a moment) in every ZeRO-3 reduce-scatter, so torch's FutureWarnings about ``all_gather_into_tensor`` and
``reduce_scatter_tensor`` came back on every collective, on every rank (7,270 of them in a 100-step CPU run).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

# Deprecations raised inside these packages are about their code, which every rank runs alike.
LIBRARIES = r"(torch|deepspeed|accelerate|transformers|peft)(\.|$)"
# DeepSpeed's log lines that every process prints alike at import (the launcher has printed one already).
DEEPSPEED_EVERY_RANK = ("Setting accelerator to CPU",)

_shown: set[tuple[type, str]] = set()
_show = warnings.showwarning


def is_main_process() -> bool:
    """Whether this is rank 0 of a launch (or a plain process): from the launcher's environment, so it holds
    before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def _show_once(message, category, filename, lineno, file=None, line=None) -> None:
    key = (category, str(message))
    if key in _shown:
        return
    _shown.add(key)
    _show(message, category, filename, lineno, file, line)


class _DropOnOtherRanks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(DEEPSPEED_EVERY_RANK)


def show_warnings_once(main: bool) -> None:
    """Show each distinct warning (category and text) at most once in this process. Not ``main``: leave out the
    FutureWarnings and DeprecationWarnings raised inside ``LIBRARIES`` (the main process shows them) and
    DeepSpeed's per-process accelerator notice. Our own warnings, and any other warning, still show on every rank.
    Call before DeepSpeed is imported (train.py: first thing in ``main``)."""
    global _show
    if warnings.showwarning is not _show_once:
        _show = warnings.showwarning
        warnings.showwarning = _show_once
    if not main:
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
        # DeepSpeed's logger keeps its filters: getLogger returns the same object when DeepSpeed sets it up.
        logging.getLogger("DeepSpeed").addFilter(_DropOnOtherRanks())


def _offloads_optimizer() -> bool:
    """Whether the DeepSpeed config of this launch keeps the optimizer on the CPU (DeepSpeed's CPU Adam)."""
    device = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        try:
            with open(path) as f:
                zero = json.load(f).get("zero_optimization", {})
            device = zero.get("offload_optimizer", {}).get("device")
        except (OSError, ValueError, AttributeError):
            return True  # unknown: say so rather than stay silent for minutes
    return device == "cpu"


def _jit_built(name: str) -> bool:
    """Whether an earlier run compiled op ``name`` into torch's extension cache (False when unknown)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return os.path.exists(os.path.join(_get_build_directory(name, verbose=False), f"{name}.so"))
    except Exception:
        return False


def deepspeed_ops_to_build() -> list[str]:
    """What DeepSpeed will compile before the first step of this launch (just in time, minutes on CPU): its
    shared-memory collectives on a CPU accelerator, CPU Adam when the optimizer is offloaded; only ops neither
    installed prebuilt nor compiled by an earlier run. [] when not launched with a DeepSpeed config."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true":
        return []
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    wanted = {"ShareMemCommBuilder": "shared-memory collectives"}
    if _offloads_optimizer():
        wanted["CPUAdamBuilder"] = "CPU Adam"
    todo = []
    for builder_name, what in wanted.items():
        builder = get_accelerator().create_op_builder(builder_name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue  # not used on this accelerator
        if not installed_ops.get(builder.name, False) and not _jit_built(builder.name):
            todo.append(what)
    return todo


def announce_op_builds(main: bool) -> None:
    """On the main process: one line before DeepSpeed's silent first-run compile (``deepspeed_ops_to_build``)."""
    todo = deepspeed_ops_to_build() if main else []
    if todo:
        print(f"DeepSpeed compiles its {' and '.join(todo)} ops first (once per machine: a few minutes on CPU, "
              "silent; later runs reuse them)", file=sys.stderr, flush=True)
