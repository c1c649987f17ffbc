"""world/default.py: the embedded default is deterministic and its data really asks for what it hid earlier."""

import re

import pytest
import torch

from easy_context.world import default


@pytest.fixture(scope="module")
def tokenizer():
    return default.build_tokenizer()


def test_tokenizer_is_deterministic_and_splits_digits(tokenizer):
    again = default.build_tokenizer()
    assert tokenizer.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    ids = tokenizer(" 1234567.", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids][1:8] == list("1234567")


@pytest.mark.parametrize("length", [256, 1000, 4096])
def test_documents_have_exact_length_and_end_with_an_answer_given_earlier(tokenizer, length):
    ids = default.retrieval_ids(tokenizer, length, seed=length)
    assert len(ids) == length and ids[0] == tokenizer.bos_token_id
    assert ids == default.retrieval_ids(tokenizer, length, seed=length)
    text = tokenizer.decode(ids[1:])
    key, number = re.search(r"What is the special magic (\w+) number\? Answer: The special magic \1 number is: "
                            r"(\d+)\.$", text).groups()
    assert f"The special magic {key} number is: {number}.\n" in text[: text.rindex("Question")]


def test_dataset_rows_are_generated_by_index(tokenizer):
    ds = default.RetrievalDataset(tokenizer, 512, size=10, seed=3)
    assert torch.equal(ds[4]["input_ids"], default.RetrievalDataset(tokenizer, 512, size=10, seed=3)[4]["input_ids"])
    assert not torch.equal(ds[4]["input_ids"], ds[5]["input_ids"])
    with pytest.raises(IndexError):
        ds[10]


def test_answer_only_labels_mark_exactly_the_answers(tokenizer):
    row = default.RetrievalDataset(tokenizer, 1024, size=4, seed=1, loss_on="answers")[2]
    ids, labels = row["input_ids"], row["labels"]
    assert torch.equal(ids, default.RetrievalDataset(tokenizer, 1024, size=4, seed=1)[2]["input_ids"])
    marked = (labels != -100).nonzero().flatten().tolist()
    assert torch.equal(labels[marked], ids[marked])
    text = tokenizer.decode(ids[1:])
    answers = re.findall(r"Answer: The special magic \w+ number is:( \d+\.)", text)
    assert tokenizer.decode(ids[marked]) == "".join(answers)  # every answer, nothing else
    assert len(answers) == 1024 // default.NEEDLE_EVERY + 1


def test_text_fraction_keeps_every_answer_and_about_that_share_of_the_rest(tokenizer):
    answers_only = default.RetrievalDataset(tokenizer, 2048, size=4, seed=1, loss_on="answers")[1]["labels"]
    mixed = default.RetrievalDataset(tokenizer, 2048, size=4, seed=1, loss_on="answers", text_fraction=0.1)[1]
    ids, labels = mixed["input_ids"], mixed["labels"]
    answer = answers_only != -100
    assert torch.equal(labels[answer], ids[answer])
    kept = labels[~answer] != -100
    assert torch.equal(labels[~answer][kept], ids[~answer][kept])
    assert 0.07 < kept.float().mean() < 0.13
    again = default.RetrievalDataset(tokenizer, 2048, size=4, seed=1, loss_on="answers", text_fraction=0.1)[1]
    assert torch.equal(again["labels"], labels)  # deterministic by row


def test_text_fraction_needs_answer_loss(tokenizer):
    with pytest.raises(ValueError, match="text_fraction"):
        default.RetrievalDataset(tokenizer, 512, loss_on="all", text_fraction=0.1)


def test_long_documents_hold_at_most_max_needles(tokenizer):
    ids, answer = default.retrieval_example(tokenizer, 8192, seed=0)
    text = tokenizer.decode(ids[1:])
    assert len(re.findall(r"\nThe special magic \w+ number is: \d+\.", text)) == default.MAX_NEEDLES
    assert len(re.findall(r"Answer: The special magic \w+ number is: \d+\.", text)) == default.MAX_NEEDLES + 1


def test_some_documents_open_with_a_needle_as_the_needle_eval_does_at_depth_0(tokenizer):
    # Without these the stage-1 model missed every depth-0 cell (needle right after BOS) by one digit.
    opening = [default.retrieval_ids(tokenizer, 1024, seed=s)[1:4] for s in range(200)]
    needle_start = tokenizer(default.needle("Paris", "1")[:14], add_special_tokens=False)["input_ids"][:3]
    share = sum(o == needle_start for o in opening) / len(opening)
    assert 0.04 < share < 0.2
