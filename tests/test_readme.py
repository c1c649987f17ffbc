"""README.md's fresh-machine set-up is what CI runs, and its links point at files that exist."""

from __future__ import annotations

import os
import re

from tests.helpers.launch import REPO


def _setup_block() -> list[str]:
    text = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"## Set up on a fresh machine\n\n```bash\n(.*?)```", text, re.S)
    assert block, "README.md opens with a '## Set up on a fresh machine' bash block"
    return [line.split("  #")[0].strip() for line in block.group(1).strip().split("\n")]


def test_ci_runs_exactly_the_readmes_install_and_test_commands():
    install, main_job, tests = _setup_block()
    ci = [line.strip() for line in open(os.path.join(REPO, ".ci", "run"))
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [install, tests]
    assert main_job.startswith("accelerate launch") and main_job.endswith("train.py")


def test_every_relative_link_in_the_docs_resolves():
    for doc in ("README.md", "docs/performance.md", "docs/proof.md"):
        text = open(os.path.join(REPO, doc)).read()
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):
            if "://" in target:
                continue
            path = os.path.join(REPO, os.path.dirname(doc), target)
            assert os.path.exists(path), f"{doc} links to {target}, which does not exist"
