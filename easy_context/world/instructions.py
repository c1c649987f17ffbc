"""Generated long instructions: questions whose answers sit deep in long generated prose, as rows of
LongAlpaca's instruction format ({"instruction", "input", "output"}; the text inside the instruction, "input"
empty, as in LongAlpaca-12k). No downloads; deterministic by seed.

Each story hides several "special magic" numbers (haystack.py's needles) at random depths; the question asks
for one of them (or which key a number belongs to), so the answer can only be copied from deep in the text.
Example lengths spread from short to the longest asked, as LongAlpaca mixes long QA with short Alpaca pairs.
"""

from __future__ import annotations

import json
import os
import random

from .haystack import KEYS, filler_sentence, needle, random_number

STORY = ("Below is a story. Memorize the story and answer my question after the story.\nThe story begins.\n"
         "{story}\nNow the story ends.\n{question}")
ASK_NUMBER = ("What is the special magic {key} number?", "The special magic {key} number is {number}.")
ASK_KEY = ("Which city has the special magic number {number}?", "The special magic number {number} belongs to "
           "{key}.")
NEEDLE_EVERY = 128  # one needle per this many tokens of story (the one asked about and distractors) ...
MAX_NEEDLES = 8  # ... up to this many


def instruction_example(tokenizer, length: int, seed: int) -> dict[str, str]:
    """{"instruction", "input": "", "output"}: a story with needles at random depths and a question about one of
    them; the output answers it. Instruction and output take about ``length`` tokens of ``tokenizer`` (up to a
    sentence fewer; never fewer than the frame, needles and question need); the prompt format adds its own few.
    Same (tokenizer, length, seed), same example."""
    rng = random.Random(seed)
    keys = rng.sample(KEYS, min(MAX_NEEDLES, max(1, length // NEEDLE_EVERY)))
    numbers = {key: random_number(rng, rng.randint(3, 7)) for key in keys}
    asked = rng.choice(keys)
    ask, reply = ASK_NUMBER if rng.random() < 0.5 else ASK_KEY
    question, output = ask.format(key=asked, number=numbers[asked]), reply.format(key=asked, number=numbers[asked])
    needles = [needle(key, numbers[key]) for key in keys]
    fixed = STORY.format(story="".join(needles), question=question) + output
    budget = length - len(tokenizer(fixed, add_special_tokens=False)["input_ids"])
    sentences: list[str] = []
    full = False
    while not full:  # the story's prose, sentence by sentence, while the next one still fits
        batch = [filler_sentence(rng) for _ in range(64)]
        for text, ids in zip(batch, tokenizer(batch, add_special_tokens=False)["input_ids"]):
            full = len(ids) > budget
            if full:
                break
            sentences.append(text)
            budget -= len(ids)
    places = [rng.randint(0, len(sentences)) for _ in needles]  # needle j goes before sentence places[j]
    story: list[str] = []
    for i, sentence in enumerate([*sentences, ""]):
        story += [needles[j] for j, place in enumerate(places) if place == i]
        story.append(sentence)
    return {"instruction": STORY.format(story="".join(story).strip(), question=question), "input": "",
            "output": output}


def instruction_examples(tokenizer, count: int, max_length: int, *, min_length: int | None = None,
                         seed: int = 0) -> list[dict[str, str]]:
    """``count`` examples of ``instruction_example``, of lengths drawn uniformly from [``min_length`` (default
    an eighth of ``max_length``), ``max_length``] tokens; example i from seed (seed, i)."""
    low = max_length // 8 if min_length is None else min_length
    if not 0 < low <= max_length:
        raise ValueError(f"example lengths must satisfy 0 < min_length <= max_length; got {low}, {max_length}")
    rng = random.Random(seed)
    lengths = [rng.randint(low, max_length) for _ in range(count)]
    return [instruction_example(tokenizer, n, seed=seed * 1_000_003 + i) for i, n in enumerate(lengths)]


def save_instructions(path: str, tokenizer, count: int, max_length: int, *, seed: int = 0) -> str:
    """Write ``instruction_examples`` as a .jsonl file (one {"instruction", "input", "output"} per line), the
    format ``train.py --dataset`` reads; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in instruction_examples(tokenizer, count, max_length, seed=seed):
            f.write(json.dumps(row) + "\n")
    return path
