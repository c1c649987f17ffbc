"""console.py: each distinct warning once per process (also when something changes the warning filters between
two of them, as DeepSpeed's per-collective subprocess does), the library deprecations left to the main process,
and the DeepSpeed ops a launch will compile."""

from __future__ import annotations

import logging
import os
import subprocess
import warnings

import pytest

from easy_context.train import console

DEPRECATED = "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `reduce_scatter_single` instead."


def _warn_from_torch(message: str, category: type = FutureWarning) -> None:
    """``message`` as torch raises it: attributed to a torch module (where a filter's ``module`` looks)."""
    warnings.warn_explicit(message, category, "c10d_logger.py", 83, module="torch.distributed.c10d_logger")


def _three_collectives(message: str) -> None:
    for _ in range(3):
        _warn_from_torch(message)
        subprocess.run(["true"], check=True)  # subprocess -> os.get_exec_path: the filters change for a moment


def _shown(log: list, text: str) -> list[str]:
    return [str(w.message) for w in log if text in str(w.message)]


def test_python_alone_repeats_a_warning_whenever_the_filters_change():
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("default")
        _three_collectives(DEPRECATED + " (plain)")
    assert len(_shown(log, "(plain)")) == 3  # the flood the console showed: one per collective


def test_the_main_process_shows_each_distinct_warning_once():
    with warnings.catch_warnings(record=True) as log:  # restores showwarning and the filters afterwards
        warnings.simplefilter("default")
        console.show_warnings_once(main=True)
        console.show_warnings_once(main=True)  # idempotent
        _three_collectives(DEPRECATED + " (main)")
        for _ in range(2):
            warnings.warn("a warning of our own (main)", UserWarning)
            subprocess.run(["true"], check=True)
    assert [w.category for w in log if "(main)" in str(w.message)] == [FutureWarning, UserWarning]


def test_other_ranks_leave_library_deprecations_to_the_main_process():
    deepspeed_log = logging.getLogger("DeepSpeed")
    kept = list(deepspeed_log.filters)
    try:
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("default")
            console.show_warnings_once(main=False)
            _three_collectives(DEPRECATED + " (other)")
            _warn_from_torch("torch says something else (other)", UserWarning)
            warnings.warn("deprecated in our own code (other)", DeprecationWarning)
        shown = _shown(log, "(other)")  # precise: category and origin, nothing else
        assert shown == ["torch says something else (other)", "deprecated in our own code (other)"]
        record = logging.LogRecord("DeepSpeed", logging.WARNING, "real_accelerator.py", 213,
                                   "Setting accelerator to CPU. If you have GPU or other accelerator, we were "
                                   "unable to detect it.", None, None)
        assert not deepspeed_log.filter(record)
        record.msg = "another DeepSpeed warning"
        assert deepspeed_log.filter(record)
    finally:
        deepspeed_log.filters[:] = kept


def test_deepspeed_ops_to_build(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    import torch

    configs = os.path.join(os.path.dirname(__file__), "..", "..", "accelerate_configs")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert console.deepspeed_ops_to_build() == []  # not a DeepSpeed launch
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing compiled yet
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", os.path.join(configs, "zero3_offload.json"))
    todo = console.deepspeed_ops_to_build()
    assert "CPU Adam" in todo
    if not torch.cuda.is_available():
        assert todo == ["shared-memory collectives", "CPU Adam"]
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", os.path.join(configs, "zero3.json"))
    assert "CPU Adam" not in console.deepspeed_ops_to_build()  # no optimizer offload: torch's AdamW
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", os.path.join(configs, "zero3_offload.json"))
    from torch.utils.cpp_extension import _get_build_directory

    open(os.path.join(_get_build_directory("cpu_adam", verbose=False), "cpu_adam.so"), "w").close()
    assert "CPU Adam" not in console.deepspeed_ops_to_build()  # an earlier run compiled it
