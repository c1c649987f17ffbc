"""The RULER-style tasks: every sample has exactly the length asked and is the same for the same seed; the reference
answer is what a plain solver computes from the prompt's own text (the needles it holds, the variable chain, the
word counts); the evidence sits at the depth asked; RULER's metrics are recall and any-match; a prompt that cannot
fit raises before any model runs."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from easy_context.eval.needle import NeedleTask, haystack_tokens
from easy_context.eval.tasks import (TASKS, answer_text, build_tasks, string_match_all, string_match_part, zeta)
from easy_context.world.default import build_tokenizer

LENGTHS = (1024, 3000, 5000)  # cwe changes its repeats at 4096


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tasks(tok):
    hay, _ = haystack_tokens(tok, 6000)
    return {t.name: t for t in build_tasks(list(TASKS), tok, hay, seed=7)}


def _depth(task, d=50.0):
    return d if task.has_depth else None


def test_every_sample_has_the_length_asked_and_is_reproducible(tok, tasks):
    hay, _ = haystack_tokens(tok, 6000)
    again = {t.name: t for t in build_tasks(list(TASKS), tok, hay, seed=7)}
    other = {t.name: t for t in build_tasks(list(TASKS), tok, hay, seed=8)}
    for name, task in tasks.items():
        for n in LENGTHS:
            s = task.sample(n, _depth(task), 0)
            assert len(s.ids) == n and s.ids[0] == tok.bos_token_id, (name, n)
            assert s.ids == again[name].sample(n, _depth(task), 0).ids  # a fresh build, same seed
            assert s.references != task.sample(n, _depth(task), 1).references
            assert s.references != other[name].sample(n, _depth(task), 0).references
            assert tok.decode(s.answer_ids) == answer_text(s.references) or name == "needle"


def _prompt(tok, s) -> str:
    return tok.decode(s.ids[1:s.answer_start])


def test_needle_is_eval_needles_prompt(tok, tasks):
    task = tasks["needle"]
    s = task.sample(1024, 30.0, 2)
    p = NeedleTask(tok, task.haystack, seed=7).prompt(1024, 30.0, task.task.number(2))
    assert (s.ids, s.answer_start, s.evidence_at) == (p.ids, p.answer_start, p.needle_at)
    assert s.references == (task.task.number(2),)


def test_magic_number_answers_are_what_the_needles_say(tok, tasks):
    for name, (keys, values, asked) in {"multikey": (4, 1, 1), "multivalue": (1, 4, 1),
                                        "multiquery": (4, 1, 4)}.items():
        for n in LENGTHS:
            s = tasks[name].sample(n, 20.0, 3)
            text = _prompt(tok, s)
            needles = re.findall(r"One of the special magic numbers for ([\w-]+) is: (\d{7})\.", text)
            assert len(needles) == keys * values and len({k for k, _ in needles}) == keys
            query = re.search(r"What (?:is|are all) the special magic numbers? for (.*?) mentioned", text).group(1)
            queried = query.replace(", and ", ", ").split(", ")
            assert len(queried) == asked
            assert s.references == tuple(v for q in queried for k, v in needles if k == q), (name, n)


def test_variable_tracking_answer_is_the_chain_that_holds_the_value(tok, tasks):
    for n in LENGTHS:
        s = tasks["vt"].sample(n, 40.0, 1)
        text = _prompt(tok, s)
        value = re.search(r"assigned the value (\d+) in the text", text).group(1)
        holds = set()
        for target, source in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", text):  # in the order they appear
            if source == value or source in holds:
                holds.add(target)
        assert set(s.references) == holds and len(holds) == 5
        order = [m.start() for m in (re.search(rf"VAR {v} =", text) for v in s.references)]
        assert order == sorted(order)  # the answer lists them as the chain goes


def test_common_words_answer_is_the_most_common_words_of_the_list(tok, tasks):
    for n, often in ((1024, 6), (5000, 30)):
        s = tasks["cwe"].sample(n, None, 0)
        text = _prompt(tok, s)
        listed = re.findall(r"\d+\. (\w+)", text[text.index("\n"):])
        counts = Counter(listed)
        top = [w for w, c in counts.items() if c == often]
        assert len(top) == 10 and max(c for w, c in counts.items() if w not in top) < often
        assert list(s.references) == [w for w in dict.fromkeys(listed) if w in top]  # first appearance
        assert [int(i) for i in re.findall(r"(\d+)\. \w+", text[text.index("\n"):])] == \
            list(range(1, len(listed) + 1))


def test_frequent_words_answer_is_the_three_most_frequent_coded_words(tok, tasks):
    for n in LENGTHS:
        s = tasks["fwe"].sample(n, None, 0)
        text = _prompt(tok, s)
        coded = text[text.index("coded words.") + len("coded words."):text.index("\nQuestion")].split()
        ranked = [w for w, _ in Counter(coded).most_common()]
        assert ranked[0] == "..." and list(s.references) == ranked[1:4]
        counts = Counter(coded)
        assert counts[ranked[3]] > counts[ranked[4]]  # a strict top 3


def test_evidence_sits_at_the_depth_asked(tok, tasks):
    for name in ("needle", "multikey", "multivalue", "multiquery", "vt"):
        task = tasks[name]
        places = [task.sample(3000, d, 0).evidence_at for d in (0.0, 25.0, 50.0, 75.0, 100.0)]
        assert places == sorted(places) and places[-1] - places[0] > 2000, (name, places)
        s = task.sample(3000, 50.0, 0)
        evidence = tok.decode(s.ids[s.evidence_at:s.evidence_at + 40])
        assert any(r in evidence for r in s.references) or name == "vt" and "VAR" in evidence, (name, evidence)


def test_a_shifted_haystack_keeps_the_task(tok, tasks):
    for name, task in tasks.items():
        s, t = task.sample(1024, _depth(task), 0), task.sample(1024, _depth(task), 0, shift=True)
        assert len(t.ids) == 1024 and t.references == s.references
        assert t.ids != s.ids or not task.has_depth and name == "cwe"  # cwe's top-up may be empty


def test_metrics_are_rulers():
    assert string_match_all(" 123, 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("The Answer Is ABCDE", ["abcde"]) == 1.0  # case-insensitive
    assert string_match_part("no 456 here", ["123", "456"]) == 1.0 and string_match_part("none", ["1"]) == 0.0
    assert zeta(2.0) == pytest.approx(3.141592653589793 ** 2 / 6, rel=1e-9)


def test_prompts_that_cannot_fit_raise_at_check(tok, tasks):
    with pytest.raises(ValueError, match="too short for a cwe prompt"):
        tasks["cwe"].check([300, 4096], samples=1)
    with pytest.raises(ValueError, match="too short for a multiquery prompt"):
        tasks["multiquery"].check([100], samples=1)
    with pytest.raises(ValueError, match="has no depth"):
        tasks["fwe"].sample(1024, 50.0, 0)
    with pytest.raises(ValueError, match="depth in 0-100"):
        tasks["vt"].sample(1024, None, 0)
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        build_tasks(["needle", "qa"], tok, [1, 2, 3])
