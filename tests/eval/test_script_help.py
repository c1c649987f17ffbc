"""The scripts' ``--help`` is the manual: every flag has help, defaults show, the text names concepts, not
source files, and every CPU example in it runs as printed (against the model the main training job writes)."""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import subprocess
import sys

import pytest

from tests.helpers.launch import REPO, env

SCRIPTS = {  # script: flag help lines that must show their default
    "train.py": ["--backend", "--max-steps", "--output-dir", "--schedule"],
    "eval_needle.py": ["--samples", "--depth-step", "--scoring", "--backend", "--dtype", "--window"],
    "eval_ppl.py": ["--split", "--protocol", "--stride", "--output", "--backend", "--window"],
    "eval_ruler.py": ["--haystack", "--samples", "--depth-step", "--scoring", "--text-split", "--backend"],
}


@functools.cache  # the text does not change within a run; both tests below read it
def _help(script: str) -> str:
    res = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return res.stdout


def _option_help(text: str, flag: str) -> str:
    """The help of ``flag`` in a --help text, on one line."""
    m = re.search(rf"^  (?:-\w [^,\n]*, )?{flag}\b.*?(?=^  -|\Z)", text, re.S | re.M)
    assert m, f"{flag} not in --help"
    return " ".join(m.group(0).split())


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_shows_defaults_and_names_no_source_file(script):
    text = _help(script)
    for flag in SCRIPTS[script]:
        assert "(default: " in _option_help(text, flag), _option_help(text, flag)
    assert {name for name in re.findall(r"[\w./-]+\.py\b", text)} == {script}
    assert "./world" not in text and "(default: None)" not in text


def _parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``script`` builds (caught as it parses)."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit):
        if script == "train.py":
            module.parse_config([])
        else:
            module.parse_args([])
    return seen[0]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_flag_has_help(script, monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    parser = _parser(script, monkeypatch)
    missing = [a.option_strings[-1] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert missing == []


def _examples(text: str) -> list[str]:
    """The shell commands of a --help text that run on one machine without a GPU: ``python3 ...`` and
    ``torchrun ...`` lines, with their backslash-continued lines, as a user would paste them."""
    commands, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None and stripped.startswith(("python3 ", "torchrun ")):
            current = [line]
        elif current is not None:
            current.append(line)
        if current is not None and not stripped.endswith("\\"):
            commands.append("\n".join(current))
            current = None
    return commands


def test_a_folder_of_text_files_given_as_dataset_points_at_text_dir(tmp_path):
    (tmp_path / "a.txt").write_text("words")
    res = subprocess.run([sys.executable, "eval_ppl.py", "-m", "any", "--dataset", str(tmp_path), "--lengths", "8"],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and f"--text-dir {tmp_path}" in res.stderr, res.stderr


def test_the_eval_examples_run_as_printed(tmp_path):
    from easy_context.world.default import build_default_world

    build_default_world(str(tmp_path / "output" / "default" / "model"))  # where the main job puts its model
    for script in ("eval_needle.py", "eval_ppl.py", "eval_ruler.py"):
        os.symlink(os.path.join(REPO, script), tmp_path / script)
    e = dict(env(), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
             HF_HUB_OFFLINE="1")
    examples = _examples(_help("eval_needle.py")) + _examples(_help("eval_ppl.py")) + _examples(_help("eval_ruler.py"))
    # needle: 1 and 2 processes; ppl: the documents, 1 process, real text, 2 processes; ruler: 1, 2, the comparison
    assert len(examples) == 9, examples
    for command in examples:
        res = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=e, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, f"{command}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert (tmp_path / "results" / "ppl.csv").exists() and (tmp_path / "results" / "ppl_2proc.csv").exists()
    assert (tmp_path / "results" / "needle" / "default_2proc.json").exists()
    assert (tmp_path / "results" / "ppl_pydoc.csv").exists() and (tmp_path / "results" / "ruler" / "comparison.png").exists()
