"""The embedded default world: a small Llama-style config, a byte-level BPE tokenizer trained here on
generated text, and a generated retrieval dataset (haystack.py) of any length; no downloads, all
deterministic by seed. ``train.py`` and the evals use it when no model/dataset is given.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any

import torch

from .haystack import KEYS, answer, filler_sentence, filler_text, needle, question, random_number, retrieval_events

VOCAB_SIZE = 1024
SPECIAL = ("<s>", "</s>", "<pad>")
# "tiny": seconds per step on a CPU; "small" (~26M parameters): the GPU proof of the recipe.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
}
NEEDLE_EVERY = 256  # one needle (and its question) per this many tokens of a training document ...
MAX_NEEDLES = 8  # ... up to this many: longer documents mean longer needle-to-question distances, not more keys


def _tokenizer_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = [filler_text(400, seed=seed + i) for i in range(8)]
    for _ in range(2000):
        key, number = rng.choice(KEYS), random_number(rng, rng.randint(1, 10))
        texts.append(needle(key, number) + question(key) + answer(number))
    return texts


def build_tokenizer(path: str | None = None, seed: int = 0):
    """A byte-level BPE tokenizer (1024 tokens, every digit its own token, BOS added) trained on generated
    text; encodes any text. Saved to ``path`` when given. Same seed, same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=int(1e12))
    if path is not None:
        fast.save_pretrained(path)
    return fast


def tiny_config(preset: str = "tiny", *, max_position_embeddings: int = 2048, rope_theta: float = 10000.0,
                vocab_size: int = VOCAB_SIZE):
    """The LlamaConfig of a preset ("tiny" or "small"), tokens of ``build_tokenizer`` (ids 0/1/2 = bos/eos/pad)."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}: use one of {', '.join(PRESETS)}")
    return LlamaConfig(**PRESETS[preset], vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                       rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
                       bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False, use_cache=False)


def retrieval_example(tokenizer, length: int, seed: int, digits: int = 7) -> tuple[list[int], list[bool]]:
    """(ids, answer mask): exactly ``length`` token ids (BOS, filler with needles, questions and answers from
    haystack.retrieval_events, the last question and its answer ending the sequence) and, per token, whether
    it is part of an answer (" 1234567."). Same (tokenizer, length, seed), same example."""
    rng = random.Random(seed)
    pieces: list[tuple[float, str, bool]] = []
    for place, text in retrieval_events(rng, min(MAX_NEEDLES, max(1, length // NEEDLE_EVERY)), digits):
        question_text, sep, answer_text = text.rpartition(":")  # a question ends "...number is:" + its answer
        asks = "Question:" in text
        pieces += [(place, question_text + sep, False), (place, answer_text, True)] if asks else [(place, text, False)]
    event_ids = tokenizer([text for _, text, _ in pieces], add_special_tokens=False)["input_ids"]
    budget = length - 1 - sum(len(e) for e in event_ids)
    if budget < 0:
        raise ValueError(f"length {length} is too short for a retrieval document; use at least {NEEDLE_EVERY}")
    filler: list[list[int]] = []
    while budget > 0:
        batch = tokenizer([filler_sentence(rng) for _ in range(64)], add_special_tokens=False)["input_ids"]
        for ids in batch:
            filler.append(ids[:budget])
            budget -= len(filler[-1])
            if budget == 0:
                break
    out, mask, e = [tokenizer.bos_token_id], [False], 0

    def add(ids: list[int], is_answer: bool) -> None:
        out.extend(ids)
        mask.extend([is_answer] * len(ids))

    for i, ids in enumerate(filler):
        while e < len(pieces) and pieces[e][0] * len(filler) <= i:
            add(event_ids[e], pieces[e][2])
            e += 1
        add(ids, False)
    for j in range(e, len(pieces)):
        add(event_ids[j], pieces[j][2])
    return out, mask


def retrieval_ids(tokenizer, length: int, seed: int, digits: int = 7) -> list[int]:
    """The token ids of ``retrieval_example``."""
    return retrieval_example(tokenizer, length, seed, digits)[0]


class RetrievalDataset(torch.utils.data.Dataset):
    """``size`` rows {"input_ids": LongTensor [length]} of ``retrieval_example``, row i from seed (seed, i):
    generated on access, so any size costs nothing and every rank gets the same row for the same index.
    ``loss_on="answers"`` adds "labels": the ids where they are answer tokens, -100 elsewhere, except that
    a random ``text_fraction`` of the other tokens keep their label too (so a model can learn the prose
    while most of its loss is on retrieval)."""

    def __init__(self, tokenizer, length: int, size: int = 1_000_000, seed: int = 0, loss_on: str = "all",
                 text_fraction: float = 0.0):
        if loss_on not in ("all", "answers"):
            raise ValueError(f"loss_on must be 'all' or 'answers'; got {loss_on!r}")
        if not 0.0 <= text_fraction <= 1.0 or (text_fraction and loss_on != "answers"):
            raise ValueError(f"text_fraction must be in [0, 1] and needs loss_on='answers'; got {text_fraction!r}")
        self.tokenizer, self.length, self.size, self.seed, self.loss_on = tokenizer, length, size, seed, loss_on
        self.text_fraction = text_fraction

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        row_seed = self.seed * 1_000_003 + i
        ids, answer = retrieval_example(self.tokenizer, self.length, seed=row_seed)
        row = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if self.loss_on == "answers":
            keep = torch.tensor(answer)
            if self.text_fraction:
                g = torch.Generator().manual_seed(row_seed)
                keep |= torch.rand(len(ids), generator=g) < self.text_fraction
            row["labels"] = torch.where(keep, row["input_ids"], -100)
        return row


def save_documents(path: str, tokenizer, count: int, length: int, seed: int = 12345) -> str:
    """Write ``count`` held-out retrieval documents of ``length`` tokens as a ``datasets`` folder
    (``save_to_disk``, column ``input_ids``) for perplexity evaluation; returns ``path``."""
    from datasets import Dataset

    rows = [retrieval_ids(tokenizer, length, seed=seed * 7919 + i) for i in range(count)]
    Dataset.from_dict({"input_ids": rows}).save_to_disk(path)
    return path


def build_default_world(path: str, *, preset: str = "tiny", max_position_embeddings: int = 2048,
                        seed: int = 0) -> str:
    """Create (once) ``path`` holding the default model (random init from ``seed``) and tokenizer, loadable
    with ``from_pretrained``; returns ``path``. An existing complete world is reused, not rebuilt."""
    from transformers import AutoModelForCausalLM

    if os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    tokenizer = build_tokenizer(seed=seed)
    config = tiny_config(preset, max_position_embeddings=max_position_embeddings, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    tmp = path.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(path):  # e.g. a leftover of an interrupted build: replace it whole
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def save_text_documents(path: str, tokenizer, count: int, length: int, seed: int = 12345) -> str:
    """Write ``count`` held-out retrieval documents of about ``length`` tokens as .txt files (no ``datasets``
    needed) for ``eval_ppl.py --text-dir``; returns ``path``."""
    os.makedirs(path, exist_ok=True)
    for i in range(count):
        ids = retrieval_ids(tokenizer, length, seed=seed * 7919 + i)
        with open(os.path.join(path, f"doc_{i:03d}.txt"), "w") as f:
            f.write(tokenizer.decode(ids[1:]))
    return path
