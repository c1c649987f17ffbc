"""Generated text with retrieval structure: filler prose, "magic number" needles, and questions about them.

One source for the needle eval's built-in haystack and the embedded default's training data, so that a
model trained on the data is asked, at evaluation, exactly the kind of question it learned. The needle
and question follow EasyContext's eval (digits of a random number, teacher-forced exact match).
Deterministic: everything is drawn from a ``random.Random`` the caller seeds.
"""

from __future__ import annotations

import random

NEEDLE = "\nThe special magic {key} number is: {number}.\n"
QUESTION = "\nQuestion: What is the special magic {key} number? Answer: The special magic {key} number is:"
ANSWER = " {number}."
KEYS = ("Singapore", "London", "Paris", "Tokyo", "Berlin", "Madrid", "Rome", "Vienna", "Cairo", "Lima", "Oslo",
        "Dublin", "Prague", "Lisbon", "Athens", "Warsaw", "Sydney", "Toronto", "Chicago", "Boston", "Denver",
        "Seattle", "Nairobi", "Lagos", "Delhi", "Mumbai", "Seoul", "Manila", "Hanoi", "Bangkok", "Santiago", "Quito")

_ADJ = ("quiet", "old", "bright", "small", "green", "heavy", "distant", "warm", "narrow", "gentle", "broken",
        "silver", "patient", "hidden", "early", "tall", "simple", "curious", "dusty", "golden")
_NOUN = ("river", "garden", "teacher", "machine", "village", "letter", "window", "forest", "harbor", "engine",
         "painter", "market", "bridge", "lamp", "mountain", "student", "kitchen", "castle", "meadow", "clock")
_VERB = ("watched", "carried", "followed", "remembered", "built", "crossed", "painted", "opened", "found",
         "visited", "described", "repaired", "answered", "measured", "praised", "ignored")
_PREP = ("near", "behind", "under", "across", "beside", "beyond", "inside", "above")
_TIME = ("In the morning", "Later that year", "Every winter", "On most days", "Long ago", "After the storm",
         "Before dawn", "By evening")


def filler_sentence(rng: random.Random) -> str:
    """One sentence of locally predictable prose, with a leading space."""
    a, n1, v, a2, n2 = rng.choice(_ADJ), rng.choice(_NOUN), rng.choice(_VERB), rng.choice(_ADJ), rng.choice(_NOUN)
    form = rng.randrange(3)
    if form == 0:
        return f" The {a} {n1} {v} the {a2} {n2}."
    if form == 1:
        return f" {rng.choice(_TIME)}, the {n1} {v} a {a2} {n2} {rng.choice(_PREP)} the {rng.choice(_NOUN)}."
    return f" A {a} {n1} stood {rng.choice(_PREP)} the {n2}, and nobody {v} it."


def filler_text(num_sentences: int, seed: int = 0) -> str:
    """``num_sentences`` filler sentences from ``seed``, in paragraphs: a built-in haystack."""
    rng = random.Random(seed)
    parts = []
    for i in range(num_sentences):
        parts.append(filler_sentence(rng))
        if i % 8 == 7:
            parts.append("\n")
    return "".join(parts)


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A number of exactly ``digits`` digits (no leading zero, so its length is what was asked)."""
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def needle(key: str, number: str) -> str:
    return NEEDLE.format(key=key, number=number)


def question(key: str) -> str:
    return QUESTION.format(key=key)


def answer(number: str) -> str:
    return ANSWER.format(number=number)


AT_START = 0.1  # share of documents whose first needle opens the text (the needle eval's depth 0)


def retrieval_events(rng: random.Random, num_needles: int, digits: int = 7) -> list[tuple[float, str]]:
    """(place in [0, 1], text) of ``num_needles`` needles with distinct keys at random places (in a share
    AT_START of documents the first at place 0.0, before any filler), a question and answer about each at a
    random later place, and a last question about a needle drawn uniformly at place 1.0 (the end), so every
    needle-to-question distance up to the document's length is trained."""
    keys = rng.sample(KEYS, min(num_needles, len(KEYS)))
    numbers = {key: random_number(rng, digits) for key in keys}
    events = []
    opens = rng.random() < AT_START
    for i, key in enumerate(keys):
        at = 0.0 if opens and i == 0 else rng.random()
        events.append((at, needle(key, numbers[key])))
        events.append((at + (1 - at) * rng.random(), question(key) + answer(numbers[key])))
    last = rng.choice(keys)
    events.append((1.0, question(last) + answer(numbers[last])))
    return sorted(events, key=lambda e: e[0])
