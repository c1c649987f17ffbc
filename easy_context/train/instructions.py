"""Instruction data for supervised fine-tuning: each row (``instruction``/``input``/``output``, the columns of
Alpaca and LongAlpaca, or chat ``messages``: a list of {role, content}) becomes one token sequence whose labels
are its token ids on the responses and -100 everywhere else.

Prompt formats (``--prompt-format``):
- "chat": the tokenizer's chat template. An instruction row is one user turn (the instruction, then its input
  on the next line) and one assistant turn. Every assistant turn is a response, through the end-of-turn text
  the template writes after it (e.g. </s>, <|im_end|>, <|eot_id|>).
- "llama2": LongAlpaca's Llama-2 prompt (``LLAMA2_PROMPT``, ``LLAMA2_PROMPT_INPUT``); the response is the
  output, then EOS. Rows of chat messages have no such format.
- "auto": "chat" when the tokenizer has a template, else "llama2".

Every row is checked before training: a row with no response, an empty instruction, malformed messages, a
dataset mixing the two formats or holding another column raise a ValueError naming the row and the fix.
"""

from __future__ import annotations

import numpy as np

PROMPT_FORMATS = ("auto", "chat", "llama2")
INSTRUCTION_COLUMNS = ("instruction", "input", "output")
MESSAGES = "messages"
IGNORE = -100

# LongLoRA's supervised fine-tuning prompts, verbatim: dvlab-research/LongLoRA, supervised-fine-tune.py
# (commit d4eb344), PROMPT_DICT["prompt_input_llama2"] for a row with a non-empty input and
# PROMPT_DICT["prompt_llama2"] otherwise; the target is the output followed by the EOS token.
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.\n"
)
LLAMA2_PROMPT_INPUT = "[INST] <<SYS>>\n" + LLAMA2_SYSTEM + "<</SYS>> \n\n {instruction} \n{input} [/INST]"
LLAMA2_PROMPT = "[INST]{instruction}[/INST]"

_FIX_RESPONSE = "every example needs the response it trains on: fill it in or remove the row"


def is_instruction_data(columns: list[str]) -> bool:
    """Whether a dataset with ``columns`` holds instruction rows (an instruction/output or messages column)."""
    return MESSAGES in columns or "instruction" in columns or "output" in columns


def data_format(ds, source: str = "", ignore_columns: tuple[str, ...] = ()) -> str:
    """"messages" or "instruction": the format every row of ``ds`` (a datasets.Dataset) is in; ValueError naming
    the row for a column of neither format (unless in ``ignore_columns``) or a row in another format than row 0."""
    columns = ds.column_names
    unknown = [c for c in columns if c not in (*INSTRUCTION_COLUMNS, MESSAGES, *ignore_columns)]
    if unknown:
        row = _first_row(ds, lambda t: _is_set(t, [unknown[0]]))
        where = "no row sets it" if row is None else f"first set in row {row}"
        raise ValueError(f"dataset {source!r}: column {unknown[0]!r} ({where}) is not an instruction column (rows hold "
                         f"{'/'.join(INSTRUCTION_COLUMNS)} or {MESSAGES}): remove it, or name it in --ignore-columns")
    inst = [c for c in INSTRUCTION_COLUMNS if c in columns]
    if MESSAGES not in columns or not inst:
        return MESSAGES if MESSAGES in columns else "instruction"
    kind = MESSAGES if _first_row(ds, lambda t: _is_set(t, [MESSAGES])) == 0 else "instruction"
    other = inst if kind == MESSAGES else [MESSAGES]
    row = _first_row(ds, lambda t: _is_set(t, other))
    if row is None:
        return kind
    names = {MESSAGES: MESSAGES, "instruction": "/".join(inst)}
    holds = (f"holds both {MESSAGES} and {names['instruction']}" if row == 0 else
             f"holds {names['instruction' if kind == MESSAGES else MESSAGES]}, row 0 {names[kind]}")
    raise ValueError(f"dataset {source!r} mixes formats: row {row} {holds}: keep one format per dataset (convert "
                     "those rows, or split the file)")


def _is_set(table, columns: list[str]):
    import pyarrow.compute as pc

    valid = [pc.is_valid(table.column(c)) for c in columns]
    out = valid[0]
    for v in valid[1:]:
        out = pc.or_(out, v)
    return out


def _first_row(ds, predicate, batch_rows: int = 8192) -> int | None:
    import pyarrow.compute as pc

    seen = 0
    for table in ds.with_format("arrow").iter(batch_size=batch_rows):
        hit = pc.index(predicate(table), True).as_py()
        if hit >= 0:
            return seen + hit
        seen += len(table)
    return None


def resolve_prompt_format(prompt_format: str, tokenizer, kind: str, source: str = "") -> str:
    """"chat" or "llama2": the format ``prompt_format`` ("auto", "chat" or "llama2") means for rows of ``kind``
    ("messages" or "instruction") and ``tokenizer``; ValueError saying what to change where none fits."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}: use one of {', '.join(PROMPT_FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if kind == MESSAGES:
        if prompt_format == "llama2":
            raise ValueError(f"dataset {source!r}: row 0 holds chat {MESSAGES!r}; --prompt-format llama2 (LongAlpaca's "
                             "prompt) formats instruction/input/output rows: use --prompt-format chat or auto")
        if not has_template:
            raise ValueError(f"dataset {source!r}: row 0 holds chat {MESSAGES!r}, but the tokenizer has no chat "
                             "template to format them: use a model whose tokenizer has one, or rows of "
                             "instruction/input/output (formatted with LongAlpaca's Llama-2 prompt)")
        return "chat"
    if prompt_format == "chat" and not has_template:
        raise ValueError("--prompt-format chat needs the tokenizer's chat template, and this tokenizer has none: "
                         "use --prompt-format llama2 (LongAlpaca's [INST] prompt) or a model whose tokenizer has "
                         "a template")
    return "chat" if prompt_format == "chat" or (prompt_format == "auto" and has_template) else "llama2"


def _text(value, name: str, where: str, *, required: bool = True) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return ""
        if name == "output":
            raise ValueError(f"{where} has no response: its 'output' is empty or missing; {_FIX_RESPONSE}")
        raise ValueError(f"{where}: its {name!r} is empty or missing; fill it in or remove the row")
    if not isinstance(value, str):
        raise ValueError(f"{where}: its {name!r} must be text, not {type(value).__name__}")
    return value


def _messages(row: dict, where: str) -> list[dict[str, str]]:
    """The checked conversation of a messages row (role and content text each; at least one response)."""
    messages = row.get(MESSAGES)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: {MESSAGES!r} must be a non-empty list of {{role, content}}; got {messages!r:.80}")
    out = []
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}: message {k} needs a 'role' (system, user or assistant); got {m!r:.80}")
        content = m.get("content")
        if role == "assistant" and (not isinstance(content, str) or not content.strip()):
            raise ValueError(f"{where} has no response in message {k}: the assistant's content is empty or "
                             f"missing; {_FIX_RESPONSE}")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"{where}: the content of message {k} must be text, not {type(content).__name__}")
        out.append({"role": role, "content": content or ""})
    if all(m["role"] != "assistant" for m in out):
        raise ValueError(f"{where} has no response: none of its messages is from the assistant; {_FIX_RESPONSE}")
    if out[0]["role"] == "assistant":
        raise ValueError(f"{where}: the conversation opens with an assistant message; a response needs a user (or "
                         "system) message before it")
    return out


def _render(tokenizer, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # a template's raise_exception (e.g. roles that do not alternate) or a jinja error
        raise ValueError(f"{where}: the tokenizer's chat template refused the conversation: {e}") from None


def chat_spans(tokenizer, messages: list[dict], where: str = "row") -> tuple[str, list[tuple[int, int]]]:
    """(text, response spans): ``messages`` rendered by the tokenizer's chat template, and each assistant turn's
    [start, end) characters in it: from the end of the conversation before it (with the generation prompt) to the
    end of the conversation through it (so the template's end-of-turn text is in the span)."""
    text = _render(tokenizer, messages, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], where)
        if not (text.startswith(through) and through.startswith(before) and len(through) > len(before)):
            raise ValueError(f"{where}: the tokenizer's chat template does not render this conversation turn by turn "
                             f"(the text through message {i} is not an extension of the text before it), so its "
                             "responses cannot be located: use --prompt-format llama2 or a tokenizer with another "
                             "template")
        spans.append((len(before), len(through)))
    return text, spans


def llama2_spans(instruction: str, input: str, output: str) -> tuple[str, list[tuple[int, int]]]:
    """(text, response span): LongAlpaca's prompt for (instruction, input) followed by ``output`` (EOS not
    included: it is appended as a token)."""
    prompt = (LLAMA2_PROMPT_INPUT if input else LLAMA2_PROMPT).format(instruction=instruction, input=input)
    return prompt + output, [(len(prompt), len(prompt) + len(output))]


def example_text(row: dict, kind: str, prompt_format: str, tokenizer,
                 where: str = "row") -> tuple[str, list[tuple[int, int]]]:
    """(text, response character spans) of one checked row of ``kind`` in ``prompt_format`` ("chat"/"llama2")."""
    if kind == MESSAGES:
        return chat_spans(tokenizer, _messages(row, where), where)
    instruction = _text(row.get("instruction"), "instruction", where)
    output = _text(row.get("output"), "output", where)
    input = _text(row.get("input"), "input", where, required=False)
    if prompt_format == "llama2":
        return llama2_spans(instruction, input, output)
    user = instruction + ("\n" + input if input else "")
    return chat_spans(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": output}], where)


def label_spans(ids, offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """Labels [n]: ``ids`` where a token starts inside one of ``spans`` (characters of the text ``offsets`` index),
    -100 elsewhere (also on tokens the tokenizer added, which cover no character)."""
    ids = np.asarray(ids, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(len(ids), 2)
    start, end = offsets[:, 0], offsets[:, 1]
    on = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        on |= (start >= a) & (start < b) & (end > start)
    return np.where(on, ids, IGNORE)


def tokenize_examples(ds, tokenizer, prompt_format: str = "auto", *, source: str = "",
                      ignore_columns: tuple[str, ...] = (), num_proc: int | None = None):
    """(examples, the prompt format used): ``ds`` (a datasets.Dataset of instruction rows) as one tokenized
    example per row: input_ids [n] and labels [n] (ids on the responses and the EOS that ends each, -100 elsewhere)
    as int32, length n and loss_tokens. ValueError naming the row for bad input (module doc)."""
    import datasets

    kind = data_format(ds, source, ignore_columns)
    fmt = resolve_prompt_format(prompt_format, tokenizer, kind, source)
    eos = tokenizer.eos_token_id
    if fmt == "llama2" and eos is None:
        raise ValueError("LongAlpaca's prompt ends each response with EOS: use a tokenizer with an EOS token")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("instruction data needs a fast tokenizer (its character offsets locate the responses)")

    def encode(batch: dict, indices: list[int]) -> dict:
        texts, spans = [], []
        for j, i in enumerate(indices):
            text, row_spans = example_text({c: batch[c][j] for c in batch}, kind, fmt, tokenizer,
                                           where=f"dataset {source!r}: row {i}")
            texts.append(text)
            spans.append(row_spans)
        # LongAlpaca's prompt starts with the tokenizer's BOS; a chat template writes its own special tokens.
        enc = tokenizer(texts, add_special_tokens=fmt == "llama2", return_offsets_mapping=True)
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "loss_tokens": []}
        for j, i in enumerate(indices):
            ids, labels = enc["input_ids"][j], label_spans(enc["input_ids"][j], enc["offset_mapping"][j], spans[j])
            if fmt == "llama2":
                ids, labels = [*ids, eos], np.append(labels, eos)
            loss = int((labels != IGNORE).sum())
            if not loss:
                raise ValueError(f"dataset {source!r}: row {i}: no token of its response survived tokenization; "
                                 f"{_FIX_RESPONSE}")
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["loss_tokens"].append(loss)
        return out

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "length": datasets.Value("int64"), "loss_tokens": datasets.Value("int64")})
    examples = ds.map(encode, batched=True, batch_size=32, with_indices=True, remove_columns=ds.column_names,
                      features=features, num_proc=num_proc, desc=f"format ({fmt}) and tokenize instructions")
    return examples, fmt
