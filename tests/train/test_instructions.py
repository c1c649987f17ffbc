"""instructions.py: instruction rows become one token sequence each, labelled on the responses only, in LongAlpaca's
Llama-2 prompt or the tokenizer's chat template; bad rows are refused naming the row."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from easy_context.train import instructions
from easy_context.train.data import load_raw
from easy_context.world import default

# A minimal chat template in the usual shape: BOS once, a role header per turn, an end-of-turn token after responses.
TEMPLATE = ("{{ '<s>' }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def plain():
    """The built-in tokenizer: no chat template."""
    return default.build_tokenizer()


@pytest.fixture(scope="module")
def chat(plain):
    tok = copy.deepcopy(plain)
    tok.chat_template = TEMPLATE
    return tok


_files = itertools.count()


@pytest.fixture(autouse=True)
def _folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def tokenize(rows: list[dict], tokenizer, prompt_format: str = "auto", **kw):
    """``rows`` written to a .jsonl file (as users hand them in), read back and tokenized."""
    path = f"rows{next(_files)}.jsonl"
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    examples, fmt = instructions.tokenize_examples(load_raw(path), tokenizer, prompt_format, source="t", **kw)
    return [(torch.tensor(e["input_ids"]), torch.tensor(e["labels"])) for e in examples], fmt


def labelled_runs(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """The maximal runs of labelled tokens, as id lists (labels must equal the ids where set)."""
    on = labels != -100
    assert torch.equal(labels[on], ids[on]), "a label that is set must be the token itself"
    runs, current = [], []
    for token, keep in zip(ids.tolist(), on.tolist()):
        if keep:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def longlora_preprocess(tokenizer, source: str, target: str) -> tuple[list[int], list[int]]:
    """LongLoRA's supervised-fine-tune.py ``preprocess``: tokenize source + target (target ends with the EOS
    text), then mask as many leading tokens as the source alone tokenizes to."""
    ids = tokenizer(source + target)["input_ids"]
    n = len(tokenizer(source)["input_ids"])
    return ids, [-100] * n + ids[n:]


@pytest.mark.parametrize("row", [
    {"instruction": "Read the story. What is the special magic Oslo number?", "input": "",
     "output": " The special magic Oslo number is 4411."},
    {"instruction": "Summarize the text.", "input": "The quiet river watched the old garden.",
     "output": "A river and a garden."},
])
def test_llama2_format_matches_longlora_preprocessing(plain, row):
    [(ids, labels)], fmt = tokenize([row], plain, "llama2")
    template = instructions.LLAMA2_PROMPT_INPUT if row["input"] else instructions.LLAMA2_PROMPT
    source = template.format(instruction=row["instruction"], input=row["input"])
    want_ids, want_labels = longlora_preprocess(plain, source, row["output"] + plain.eos_token)
    assert fmt == "llama2"
    assert ids.tolist() == want_ids and labels.tolist() == want_labels
    assert plain.decode(labels[labels != -100]) == row["output"] + plain.eos_token


def test_longalpaca_prompts_are_longloras():
    assert instructions.LLAMA2_PROMPT.format(instruction="Q?") == "[INST]Q?[/INST]"
    with_input = instructions.LLAMA2_PROMPT_INPUT.format(instruction="Q?", input="text")
    assert with_input.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.")
    assert with_input.endswith("<</SYS>> \n\n Q? \ntext [/INST]")


def test_chat_format_labels_every_assistant_turn_through_its_end_of_turn_token(chat):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "The special magic Lima number is 12. What is it?"},
                {"role": "assistant", "content": "It is 12."},
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": "24."}]
    [(ids, labels)], fmt = tokenize([{"messages": messages}], chat)
    assert fmt == "chat"
    assert ids.tolist() == chat(chat.apply_chat_template(messages, tokenize=False),
                                add_special_tokens=False)["input_ids"]
    assert [chat.decode(r) for r in labelled_runs(ids, labels)] == ["It is 12.</s>", "24.</s>"]


def test_auto_uses_the_chat_template_when_there_is_one_and_longalpacas_prompt_otherwise(plain, chat):
    row = {"instruction": "What is the number?", "input": "The number is 7.", "output": "7."}
    [(ids, labels)], fmt = tokenize([row], chat)
    assert fmt == "chat"
    assert chat.decode(ids) == "<s><|user|>What is the number?\nThe number is 7.<|assistant|>7.</s>"
    assert [chat.decode(r) for r in labelled_runs(ids, labels)] == ["7.</s>"]
    assert tokenize([row], plain)[1] == "llama2"
    assert tokenize([row], chat, "llama2")[1] == "llama2"  # the flag overrides the template


@pytest.mark.parametrize("rows, message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}],
     r"row 1 has no response: its 'output' is empty"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"instruction": "d", "output": "e"}],
     r"row 1 has no response: its 'output' is empty or missing"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "  ", "output": "b"}], r"row 1: its 'instruction' is empty"),
    ([{"instruction": "a", "output": "b"}, {"messages": [{"role": "user", "content": "c"},
                                                        {"role": "assistant", "content": "d"}]}],
     r"mixes formats: row 1 holds messages, row 0 instruction/output"),
    ([{"instruction": "a", "output": "b", "messages": [{"role": "user", "content": "c"}]}],
     r"mixes formats: row 0 holds both messages and instruction/output"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b", "source": "x"}],
     r"column 'source' \(first set in row 1\) is not an instruction column.*--ignore-columns"),
])
def test_bad_rows_are_refused_naming_the_row(plain, rows, message):
    with pytest.raises(ValueError, match=message):
        tokenize(rows, plain)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "a"}], r"row 1 has no response: none of its messages is from the assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
     r"row 1 has no response in message 1: the assistant's content is empty"),
    ([{"role": "assistant", "content": "a"}], r"row 1: the conversation opens with an assistant message"),
    ([{"content": "a"}, {"role": "assistant", "content": "b"}], r"row 1: message 0 needs a 'role'"),
])
def test_bad_conversations_are_refused_naming_the_row(chat, messages, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match=message):
        tokenize([good, {"messages": messages}], chat)


def test_a_missing_chat_template_is_refused_with_the_fix(plain, chat):
    with pytest.raises(ValueError, match=r"row 0 holds chat 'messages', but the tokenizer has no chat template"):
        tokenize([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], plain)
    with pytest.raises(ValueError, match=r"--prompt-format chat needs the tokenizer's chat template.*llama2"):
        tokenize([{"instruction": "a", "output": "b"}], plain, "chat")
    with pytest.raises(ValueError, match=r"--prompt-format llama2 .* formats instruction/input/output rows"):
        tokenize([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], chat,
                 "llama2")


def test_a_template_that_does_not_render_turn_by_turn_is_refused_naming_the_row(chat):
    counting = copy.deepcopy(chat)  # writes the number of turns first: earlier turns are no prefix of later ones
    counting.chat_template = "{{ messages | length }}" + TEMPLATE
    with pytest.raises(ValueError, match=r"row 0: the tokenizer's chat template does not render this conversation "
                                         r"turn by turn"):
        tokenize([{"instruction": "a", "output": "b"}], counting)


def test_ignored_columns_are_left_out(plain):
    rows = [{"instruction": "a", "output": "b", "source": "x"}]
    [(ids, _)], _ = tokenize(rows, plain, ignore_columns=("source",))
    assert "x" not in plain.decode(ids)
