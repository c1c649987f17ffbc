"""world/instructions.py: generated long instructions whose answers sit deep in the text, in LongAlpaca's format."""

from __future__ import annotations

import re

import pytest

from easy_context.train.data import load_raw
from easy_context.world import default, haystack
from easy_context.world import instructions as gen


@pytest.fixture(scope="module")
def tokenizer():
    return default.build_tokenizer()


def needles(text: str) -> dict[str, str]:
    """key -> number of every needle in ``text``."""
    found = re.findall(r"The special magic (\w+) number is: (\d+)\.", text)
    assert len(found) == len({k for k, _ in found}), "each key is hidden once"
    return dict(found)


@pytest.mark.parametrize("length", [150, 600, 2000])
def test_the_answer_is_only_in_the_story_and_the_example_has_the_length_asked(tokenizer, length):
    for seed in range(4):
        ex = gen.instruction_example(tokenizer, length, seed=seed)
        assert ex["input"] == ""  # LongAlpaca's way: the text is inside the instruction
        story, question = ex["instruction"].split("\nNow the story ends.\n")
        hidden = needles(story)
        by_key = re.fullmatch(r"What is the special magic (\w+) number\?", question)
        by_number = re.fullmatch(r"Which city has the special magic number (\d+)\?", question)
        if by_key:  # the question gives one half of a needle, the output the other
            key = by_key.group(1)
        else:
            [key] = [k for k, n in hidden.items() if n == by_number.group(1)]
        assert re.search(rf"\b{key}\b", ex["output"]) and re.search(rf"\b{hidden[key]}\b", ex["output"])
        n = len(tokenizer(ex["instruction"] + ex["output"], add_special_tokens=False)["input_ids"])
        assert length - 20 <= n <= length + 2  # at most one sentence short, a joining token over


def test_examples_are_deterministic_and_hide_the_answer_at_every_depth(tokenizer):
    assert gen.instruction_example(tokenizer, 800, seed=9) == gen.instruction_example(tokenizer, 800, seed=9)
    depths = []
    for ex in gen.instruction_examples(tokenizer, 40, 800, min_length=600, seed=1):
        story, question = ex["instruction"].split("\nNow the story ends.\n")
        key = re.search(r"(\w+) number is|belongs to (\w+)", ex["output"])
        key = key.group(1) or key.group(2)
        depths.append(story.index(haystack.needle(key, needles(story)[key]).strip()) / len(story))
    assert min(depths) < 0.25 and max(depths) > 0.75  # answers early, in the middle and deep in the text


def test_saved_instructions_load_as_instruction_rows(tmp_path, tokenizer):
    path = gen.save_instructions(str(tmp_path / "sub" / "long.jsonl"), tokenizer, 6, 300, seed=2)
    ds = load_raw(path)
    assert sorted(ds.column_names) == ["input", "instruction", "output"] and len(ds) == 6
    assert list(ds) == gen.instruction_examples(tokenizer, 6, 300, seed=2)
    lengths = [len(tokenizer(r["instruction"] + r["output"])["input_ids"]) for r in ds]
    assert max(lengths) <= 300 + 3 and min(lengths) < 200  # lengths spread up to the longest asked
