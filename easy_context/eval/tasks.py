"""RULER's synthetic long-context tasks (NVIDIA/RULER, Hsieh et al. 2024), generated offline, deterministically by seed,
at any token length; and the metrics RULER scores them with.

Every task makes ``TaskSample``s through one interface, ``Task.sample(length, depth, sample)``: exactly ``length``
token ids, [BOS] + prompt + answer, where the answer is the reference continuation (scored by ``eval.ruler``), and
the strings RULER's metric looks for. As in ``needle.py``, each piece (instruction, haystack, needle, question,
answer) is tokenized on its own and the pieces' ids are joined; the haystack is tokenized once (``haystack_tokens``)
and its first tokens fill the room the other pieces leave (``shift=True`` starts it at a random offset instead:
for training rows). Needles go in after the next sentence end at their depth, as in ``needle.py``.

Tasks (RULER's prompts, verbatim, in its configuration of ``scripts/synthetic.yaml``, except where stated):

* ``needle``: EasyContext's needle, exactly as ``needle.py`` builds it (its template, key and digits); the number is
  the same in every cell of a sample.
* ``multikey`` (RULER niah_multikey_1): 4 needles "One of the special magic numbers for KEY is: VALUE." with
  distinct word keys; one is asked for, the other 3 are distractors.
* ``multivalue`` (niah_multivalue): 4 needles with the same key and 4 values; all 4 are asked for.
* ``multiquery`` (niah_multiquery): 4 needles with distinct keys; all 4 keys are asked for.
* ``vt`` (variable tracking): one chain "VAR A = 12345", "VAR B = VAR A", ... of 4 hops; every variable that holds
  the value is asked for.
* ``cwe`` (common words extraction): a numbered list of words in which 10 words appear 30 times each and the others
  3 times (6 and 1 below 4096 tokens, as RULER); the 10 are asked for.
* ``fwe`` (frequent words extraction): coded 6-letter words drawn with Zipf frequencies (alpha 2), the most frequent
  one being "..." (noise); the next 3 are asked for.

For the ``depth`` tasks (all but cwe and fwe) one piece of evidence sits at the cell's depth (the queried needle, the
first value, the first key asked, the chain's first assignment) and the others at random depths (the chain's later
hops at random depths after it, in order). Keys are adjective-noun words as RULER's (from a shorter word list);
values are 7-digit numbers. Departures from RULER, all so that a model trained on these tasks can be scored
teacher-forced: the reference answer is written out as " A, B, C." in a fixed order (order of appearance in the
context for multivalue, vt and cwe; the question's order for multiquery; frequency order for fwe), the leading space
moved from RULER's answer prefix into the answer; no few-shot example precedes cwe and vt; cwe draws generated
pseudo-words (RULER: the wonderwords lists); a cwe or fwe prompt whose list falls a few tokens short of ``length``
is topped up with haystack text before its instruction, so that every prompt has exactly ``length`` tokens.

Metrics (RULER's ``scripts/eval/synthetic/constants.py``): ``string_match_all``, the fraction of the references that
occur in the prediction (case-insensitive substrings), is RULER's metric for every task here: all-or-nothing for
the one-reference tasks (needle, multikey), recall for the others (multivalue, multiquery, vt, cwe, fwe).
``string_match_part`` (1 if any reference occurs) is RULER's QA metric, kept for tasks with alternative answers.
A task's score at a length is the mean over its samples, times 100.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

from .needle import NeedleTask, insertion_point, sentence_end_ids

NUM_DIGITS = 7
ADJECTIVES = ("able", "ancient", "brave", "calm", "clever", "crisp", "eager", "fancy", "fierce", "fresh", "glad",
              "grand", "happy", "honest", "humble", "jolly", "kind", "lively", "lucky", "mellow", "modest", "noble",
              "odd", "plain", "polite", "proud", "rapid", "rare", "rough", "royal", "shiny", "shy", "silent", "sleepy",
              "smooth", "solid", "steady", "sturdy", "swift", "tender", "tidy", "tiny", "vivid", "wild", "wise",
              "witty", "young", "zealous")
NOUNS = ("anchor", "apple", "arrow", "badge", "basket", "beacon", "blanket", "button", "cabin", "candle", "canyon",
         "carpet", "cherry", "cloud", "comet", "copper", "cotton", "crystal", "dolphin", "drum", "falcon", "feather",
         "fountain", "glacier", "hammer", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon",
         "magnet", "maple", "mirror", "needle", "orchid", "otter", "pebble", "pepper", "pillow", "planet", "pocket",
         "rabbit", "ribbon", "saddle", "shovel", "spider", "statue", "thunder", "tiger", "tulip", "violin", "wagon",
         "walnut", "whistle", "willow", "zebra")
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # cwe's pseudo-words: "tamiro", "vesu", ...


# ---- metrics ----------------------------------------------------------------------------------------------------

def string_match_all(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """RULER's ``string_match_all`` of one sample: the fraction of ``references`` that occur in ``prediction``,
    ignoring case (recall; all-or-nothing for one reference)."""
    text = prediction.lower()
    return sum(r.lower() in text for r in references) / len(references)


def string_match_part(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """RULER's ``string_match_part`` of one sample: 1.0 if any of ``references`` occurs in ``prediction``, ignoring
    case, else 0.0 (RULER's QA metric)."""
    text = prediction.lower()
    return float(any(r.lower() in text for r in references))


METRICS: dict[str, Callable[[str, tuple[str, ...]], float]] = {"all": string_match_all, "part": string_match_part}


# ---- the interface ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSample:
    """One scored sequence: ``ids`` (prompt then reference answer, exactly the length asked), where the answer
    starts, the strings the metric looks for, and where the evidence at the cell's depth starts (None: no depth)."""

    ids: list[int]
    answer_start: int
    references: tuple[str, ...]
    evidence_at: int | None

    @property
    def answer_ids(self) -> list[int]:
        return self.ids[self.answer_start:]


def answer_text(items: list[str] | tuple[str, ...]) -> str:
    """The reference answer every RULER task here ends with: " A, B, C."."""
    return " " + ", ".join(items) + "."


class Task:
    """A task over a tokenizer and a haystack (token ids): ``sample(length, depth, sample)`` is deterministic in
    (seed, task, length, depth, sample). ``has_depth``: whether depth places evidence (else it must be None);
    ``metric``: a key of ``METRICS``."""

    name = ""
    metric = "all"
    has_depth = True

    def __init__(self, tokenizer, haystack_ids: list[int], *, seed: int = 0):
        if not haystack_ids:
            raise ValueError("the haystack holds no tokens")
        self.tokenizer, self.haystack, self.seed = tokenizer, haystack_ids, seed
        self.bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self._ends: set[int] | None = None
        self._cache: dict[str, list[int]] = {}

    @property
    def ends(self) -> set[int]:
        """The haystack's sentence-ending token ids (where needles go in)."""
        if self._ends is None:
            self._ends = sentence_end_ids(self.tokenizer, self.haystack)
        return self._ends

    def definition(self) -> dict:
        """What the samples depend on besides the tokenizer and the haystack (for a results file's settings)."""
        return {"seed": self.seed}

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` on its own (no special tokens); cached."""
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return self._cache[text]

    def rng(self, length: int, depth: float | None, sample: int, what: str = "") -> random.Random:
        """The random source of one sample (a string seed: the same on every machine and Python run)."""
        return random.Random(f"{self.seed}/{self.name}/{length}/{depth}/{sample}/{what}")

    def check_depth(self, depth: float | None) -> None:
        """Raise a ValueError for a depth this task cannot take."""
        if self.has_depth and (depth is None or not 0 <= depth <= 100):
            raise ValueError(f"task {self.name} places its evidence at a depth in 0-100 percent; got {depth}")
        if not self.has_depth and depth is not None:
            raise ValueError(f"task {self.name} has no depth (its whole context is the evidence); got {depth}")

    def sample(self, length: int, depth: float | None, sample: int, *, shift: bool = False) -> TaskSample:
        """The ``length``-token sample (module doc); ``shift``: the haystack starts at a random offset."""
        raise NotImplementedError

    def check(self, lengths: list[int], samples: int) -> None:
        """Raise a ValueError, before any forward pass, if the shortest length cannot hold some sample's prompt."""
        for s in range(samples):
            self.sample(min(lengths), 0.0 if self.has_depth else None, s)

    def window(self, room: int, rng: random.Random, shift: bool) -> list[int]:
        """``room`` haystack tokens: its first ones, or (``shift``) from a random offset."""
        if room > len(self.haystack):
            raise ValueError(f"the haystack has {len(self.haystack)} tokens, {room} are needed: build it for the "
                             "largest length (haystack_tokens)")
        start = rng.randrange(len(self.haystack) - room + 1) if shift else 0
        return self.haystack[start:start + room]

    def too_short(self, length: int, fixed: int) -> ValueError:
        return ValueError(f"length {length} is too short for a {self.name} prompt: its fixed parts take {fixed} tokens; "
                          "use a longer length or leave the task out")

    def assemble(self, length: int, rng: random.Random, head: list[int], inserts: list[tuple[float, list[int]]],
                 tail: list[int], answer: list[int], shift: bool) -> tuple[list[int], list[int]]:
        """(ids, where each insert starts): head + haystack with the inserts at their depths (percent) + tail +
        answer, exactly ``length`` tokens. Inserts appear in the order of ``appearance(depths)``."""
        fixed = len(head) + sum(len(ids) for _, ids in inserts) + len(tail) + len(answer)
        if fixed > length:
            raise self.too_short(length, fixed)
        hay = self.window(length - fixed, rng, shift)
        points = [insertion_point(hay, depth, self.ends) for depth, _ in inserts]
        ids, starts, done = list(head), [0] * len(inserts), 0
        for i in appearance([depth for depth, _ in inserts]):
            ids += hay[done:points[i]]
            starts[i] = len(ids)
            ids += inserts[i][1]
            done = points[i]
        ids += hay[done:] + tail + answer
        return ids, starts


def appearance(depths: list[float]) -> list[int]:
    """The indices of inserts at ``depths`` in the order they appear: by depth, ties in list order. (A needle's
    place never decreases with its depth, so this is their order in the text.)"""
    return sorted(range(len(depths)), key=lambda i: (depths[i], i))


# ---- tasks ------------------------------------------------------------------------------------------------------

class Needle(Task):
    """EasyContext's needle (``needle.NeedleTask``): one number, asked for by its key."""

    name = "needle"

    def __init__(self, tokenizer, haystack_ids: list[int], *, seed: int = 0, template: str = "default",
                 key: str = "Singapore", digits: int = NUM_DIGITS):
        super().__init__(tokenizer, haystack_ids, seed=seed)
        self.template = template
        self.task = NeedleTask(tokenizer, haystack_ids, template=template, key=key, digits=digits, seed=seed)

    def definition(self) -> dict:
        return {"seed": self.seed, "template": self.template, "key": self.task.key, "digits": self.task.digits}

    def sample(self, length: int, depth: float | None, sample: int, *, shift: bool = False) -> TaskSample:
        self.check_depth(depth)
        number = self.task.number(sample)
        offset = self.rng(length, depth, sample).randrange(1 << 62) if shift else 0
        p = self.task.prompt(length, depth, number, offset)
        return TaskSample(p.ids, p.answer_start, (number,), p.needle_at)


def _distinct(make: Callable[[], str], taken: set[str]) -> str:
    while True:
        value = make()
        if value not in taken:
            taken.add(value)
            return value


class MagicNumbers(Task):
    """RULER's NIAH family over word keys and 7-digit values: ``keys`` needles' keys, ``values`` per key, ``queries``
    of the keys asked for (multikey: 4/1/1, multivalue: 1/4/1, multiquery: 4/1/4)."""

    def __init__(self, tokenizer, haystack_ids: list[int], *, seed: int = 0, name: str = "multikey", keys: int = 4,
                 values: int = 1, queries: int = 1):
        super().__init__(tokenizer, haystack_ids, seed=seed)
        if not 1 <= queries <= keys or values < 1:
            raise ValueError(f"{name}: need 1 <= queries <= keys and values >= 1; got {keys}/{values}/{queries}")
        self.name, self.keys, self.values, self.queries = name, keys, values, queries

    def definition(self) -> dict:
        return {"seed": self.seed, "keys": self.keys, "values": self.values, "queries": self.queries}

    def sample(self, length: int, depth: float | None, sample: int, *, shift: bool = False) -> TaskSample:
        self.check_depth(depth)
        rng = self.rng(length, depth, sample)
        taken: set[str] = set()
        keys = [_distinct(lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}", taken) for _ in range(self.keys)]
        needles = [(k, _distinct(lambda: str(rng.randrange(10 ** (NUM_DIGITS - 1), 10 ** NUM_DIGITS)), taken))
                   for k in keys for _ in range(self.values)]
        asked = rng.sample(keys, self.queries)
        # The evidence at the cell's depth: a needle of the first key asked; the other needles at random depths.
        anchor = next(i for i, (k, _) in enumerate(needles) if k == asked[0])
        depths = [float(depth) if i == anchor else rng.uniform(0, 100) for i in range(len(needles))]
        refs = [needles[i][1] for k in asked for i in appearance(depths) if needles[i][0] == k]
        one = len(refs) == 1
        kind = "number" if one else "numbers"
        query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
        head = self.bos + self.encode(
            (f"A special magic {kind} is hidden" if one else f"Some special magic {kind} are hidden") +
            f" within the following text. Make sure to memorize it. I will quiz you about the {kind} afterwards.\n")
        tail = self.encode(f"\nWhat {'is the' if one else 'are all the'} special magic {kind} for {query} mentioned in "
                           f"the provided text? The special magic {kind} for {query} mentioned in the provided text "
                           f"{'is' if one else 'are'}")
        inserts = [(d, self.encode(f" One of the special magic numbers for {k} is: {v}.")) for d, (k, v) in
                   zip(depths, needles)]
        answer = self.encode(answer_text(refs))
        ids, starts = self.assemble(length, rng, head, inserts, tail, answer, shift)
        return TaskSample(ids, len(ids) - len(answer), tuple(refs), starts[anchor])


class VariableTracking(Task):
    """RULER's variable tracking: "VAR A = 12345" then ``hops`` assignments "VAR B = VAR A", ... in order, the first
    at the cell's depth and the rest at random depths after it; every variable holding the value is asked for."""

    name = "vt"

    def __init__(self, tokenizer, haystack_ids: list[int], *, seed: int = 0, hops: int = 4):
        super().__init__(tokenizer, haystack_ids, seed=seed)
        if hops < 1:
            raise ValueError(f"variable tracking needs at least 1 hop; got {hops}")
        self.hops = hops

    def definition(self) -> dict:
        return {"seed": self.seed, "hops": self.hops}

    def sample(self, length: int, depth: float | None, sample: int, *, shift: bool = False) -> TaskSample:
        self.check_depth(depth)
        rng = self.rng(length, depth, sample)
        taken: set[str] = set()
        names = [_distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), taken)
                 for _ in range(self.hops + 1)]
        value = str(rng.randint(10000, 99999))
        statements = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        depths = [float(depth)] + sorted(rng.uniform(depth, 100) for _ in range(self.hops))
        head = self.bos + self.encode("Memorize and track the chain(s) of variable assignment hidden in the following "
                                      "text.\n\n")
        tail = self.encode(f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                           "Answer: According to the chain(s) of variable assignment in the text above, "
                           f"{self.hops + 1} variables are assigned the value {value}, they are:")
        answer = self.encode(answer_text(names))
        ids, starts = self.assemble(length, rng, head, [(d, self.encode(s)) for d, s in zip(depths, statements)], tail,
                                    answer, shift)
        return TaskSample(ids, len(ids) - len(answer), tuple(names), starts[0])


ANSWER_MARGIN = 8  # tokens kept free while sizing a word list, for an answer that tokenizes longer in its final order


class WordList(Task):
    """The aggregation tasks' shared sizing: a word list as long as fits, topped up with haystack text (module doc)."""

    has_depth = False

    def fill(self, length: int, rng: random.Random, head: str, tail: str, answer_guess: str,
             list_tokens: Callable[[int], int], shift: bool) -> tuple[int, list[int], list[int], int]:
        """(n, head ids, tail ids, list budget): the largest ``n`` whose list (``list_tokens(n)`` tokens, never
        decreasing in n) fits in ``length`` with the head, tail and an answer like ``answer_guess``; ``n`` >= 1."""
        head_ids, tail_ids = self.bos + self.encode(head), self.encode(tail)
        budget = length - len(head_ids) - len(tail_ids) - len(self.encode(answer_guess)) - ANSWER_MARGIN
        if list_tokens(1) > budget:
            raise self.too_short(length, length - budget + list_tokens(1))
        low, high = 1, 2
        while list_tokens(high) <= budget:
            low, high = high, high * 2
        while high - low > 1:  # list_tokens(low) fits, list_tokens(high) does not
            mid = (low + high) // 2
            low, high = (mid, high) if list_tokens(mid) <= budget else (low, mid)
        return low, head_ids, tail_ids, budget

    def finish(self, length: int, rng: random.Random, head_ids: list[int], body: list[int], tail_ids: list[int],
               answer: list[int], shift: bool) -> list[int]:
        """BOS, haystack text topping the prompt up to exactly ``length``, the rest of the head, body, tail, answer."""
        short = length - len(head_ids) - len(body) - len(tail_ids) - len(answer)
        if short < 0:
            raise self.too_short(length, length - short)
        bos = len(self.bos)
        return head_ids[:bos] + self.window(short, rng, shift) + head_ids[bos:] + body + tail_ids + answer


class CommonWords(WordList):
    """RULER's common words extraction: ``common`` words ``frequent`` times each among words listed ``rare`` times
    each, in a numbered list as long as fits (below ``SHORT_BELOW`` tokens: ``short_repeats``, as RULER)."""

    name = "cwe"
    SHORT_BELOW = 4096

    def __init__(self, tokenizer, haystack_ids: list[int], *, seed: int = 0, common: int = 10, repeats=(30, 3),
                 short_repeats=(6, 1)):
        super().__init__(tokenizer, haystack_ids, seed=seed)
        if common < 1 or min(*repeats, *short_repeats) < 1 or repeats[0] <= repeats[1] or \
                short_repeats[0] <= short_repeats[1]:
            raise ValueError(f"cwe needs common words repeated more often than the others; got {repeats}, "
                             f"{short_repeats}")
        self.common, self.repeats, self.short_repeats = common, tuple(repeats), tuple(short_repeats)
        self._number_tokens = [0]  # prefix sums of the tokens of " 1.", " 2.", ...

    def definition(self) -> dict:
        return {"seed": self.seed, "common": self.common, "repeats": list(self.repeats),
                "short_repeats": list(self.short_repeats), "short_below": self.SHORT_BELOW}

    def _numbers(self, n: int) -> int:
        while len(self._number_tokens) <= n:
            self._number_tokens.append(self._number_tokens[-1] + len(self.encode(f" {len(self._number_tokens)}.")))
        return self._number_tokens[n]

    def sample(self, length: int, depth: float | None, sample: int, *, shift: bool = False) -> TaskSample:
        self.check_depth(depth)
        rng = self.rng(length, depth, sample)
        often, rarely = self.repeats if length >= self.SHORT_BELOW else self.short_repeats
        words_rng, taken = self.rng(length, depth, sample, "words"), set()
        words: list[str] = []

        def word(i: int) -> str:  # the i-th distinct pseudo-word, drawn as the sizing needs more
            while len(words) <= i:
                words.append(_distinct(lambda: "".join(words_rng.choices(_SYLLABLES, k=words_rng.randint(2, 3))),
                                       taken))
            return words[i]

        def list_tokens(rare: int) -> int:
            count = self.common * often + rare * rarely
            return self._numbers(count) + sum(len(self.encode(" " + word(i))) * (often if i < self.common else rarely)
                                              for i in range(self.common + rare))

        # The list's token count sums over every word for each candidate size: cheap next to a forward pass.
        head = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n")
        tail = (f"\nQuestion: What are the {self.common} most common words in the above list? Answer: The top "
                f"{self.common} words that appear most often in the list are:")
        guess = answer_text([word(i) for i in range(self.common)])
        rare, head_ids, tail_ids, _ = self.fill(length, rng, head, tail, guess, list_tokens, shift)
        listed = [word(i) for i in range(self.common) for _ in range(often)] + \
                 [word(i) for i in range(self.common, self.common + rare) for _ in range(rarely)]
        rng.shuffle(listed)
        body = [t for i, w in enumerate(listed) for t in self.encode(f" {i + 1}.") + self.encode(" " + w)]
        common = set(words[:self.common])
        refs = list(dict.fromkeys(w for w in listed if w in common))  # in order of first appearance
        answer = self.encode(answer_text(refs))
        ids = self.finish(length, rng, head_ids, body, tail_ids, answer, shift)
        return TaskSample(ids, len(ids) - len(answer), tuple(refs), None)


def zeta(alpha: float, terms: int = 1000) -> float:
    """The Riemann zeta function at ``alpha`` > 1 (Euler-Maclaurin: ``terms`` terms, the integral and half the
    last; relative error below 1e-9 at alpha 2)."""
    return sum(k ** -alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1) + terms ** -alpha / 2


class FrequentWords(WordList):
    """RULER's frequent words extraction: coded ``letters``-letter words, word k of a ``length // 50`` vocabulary
    drawn ``int(n k^-alpha / zeta(alpha))`` times (k = 1: "...", noise), shuffled, as many as fit; the words ranked
    2-4 are asked for, most frequent first."""

    name = "fwe"

    def __init__(self, tokenizer, haystack_ids: list[int], *, seed: int = 0, alpha: float = 2.0, letters: int = 6):
        super().__init__(tokenizer, haystack_ids, seed=seed)
        if alpha <= 1 or letters < 1:
            raise ValueError(f"fwe needs alpha > 1 and words of at least 1 letter; got {alpha}, {letters}")
        self.alpha, self.letters = alpha, letters

    def definition(self) -> dict:
        return {"seed": self.seed, "alpha": self.alpha, "letters": self.letters}

    def sample(self, length: int, depth: float | None, sample: int, *, shift: bool = False) -> TaskSample:
        self.check_depth(depth)
        rng = self.rng(length, depth, sample)
        taken: set[str] = set()
        vocab = ["..."] + [_distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=self.letters)), taken)
                           for _ in range(max(length // 50, 5) - 1)]
        z = zeta(self.alpha)

        def counts(n: int) -> list[int]:
            return [int(n * k ** -self.alpha / z) for k in range(1, len(vocab) + 1)]

        sizes = [len(self.encode(" " + w)) for w in vocab]
        head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words.")
        tail = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text? Answer: According to the coded text above, the "
                "three most frequently appeared words are:")
        refs = vocab[1:4]
        n, head_ids, tail_ids, _ = self.fill(length, rng, head, tail, answer_text(refs),
                                             lambda n: sum(c * s for c, s in zip(counts(n), sizes)), shift)
        c = counts(n)
        if not c[1] > c[2] > c[3] > max(c[4:], default=0):
            raise ValueError(f"length {length} is too short for fwe: its coded text cannot rank 3 words above the rest "
                             f"({c[1:5]} occurrences); use at least 512 tokens")
        listed = [w for w, k in zip(vocab, c) for _ in range(k)]
        rng.shuffle(listed)
        body = [t for w in listed for t in self.encode(" " + w)]
        answer = self.encode(answer_text(refs))
        ids = self.finish(length, rng, head_ids, body, tail_ids, answer, shift)
        return TaskSample(ids, len(ids) - len(answer), tuple(refs), None)


# ---- the suite --------------------------------------------------------------------------------------------------

TASKS: dict[str, Callable[..., Task]] = {
    "needle": Needle,
    "multikey": lambda tok, hay, seed=0: MagicNumbers(tok, hay, seed=seed, name="multikey", keys=4),
    "multivalue": lambda tok, hay, seed=0: MagicNumbers(tok, hay, seed=seed, name="multivalue", keys=1, values=4),
    "multiquery": lambda tok, hay, seed=0: MagicNumbers(tok, hay, seed=seed, name="multiquery", keys=4, queries=4),
    "vt": VariableTracking,
    "cwe": CommonWords,
    "fwe": FrequentWords,
}


def build_tasks(names: list[str], tokenizer, haystack_ids: list[int], *, seed: int = 0,
                template: str = "default") -> list[Task]:
    """The tasks ``names`` (keys of ``TASKS``, in that order) over one tokenizer and haystack; ``template``: the
    needle task's (``needle.TEMPLATES``). ValueError naming the known tasks for an unknown one."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}: use some of {', '.join(TASKS)}")
    return [Needle(tokenizer, haystack_ids, seed=seed, template=template) if n == "needle" else
            TASKS[n](tokenizer, haystack_ids, seed=seed) for n in dict.fromkeys(names)]
