"""The documents an eval reads: the .txt files of a directory (also the needle's haystack), dataset rows, real text
(``world.real_text``) cut into documents of a given token count, and the tokenized documents a perplexity sweep
scores (those long enough for its largest length)."""

from __future__ import annotations

import glob
import os
from typing import Iterable, Iterator

from ..train.data import load_raw
from ..world import real_text


def text_files(path: str, what: str = "text directory") -> Iterator[str]:
    """The text of each .txt file of ``path``, in name order; ValueError naming ``what`` when there are none."""
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} does not exist")
    files = sorted(glob.glob(os.path.join(path, "*.txt")))
    if not files:
        raise ValueError(f"{what} {path!r} has no .txt files")
    for name in files:
        with open(name, encoding="utf-8") as f:
            yield f.read()


def text_dir_rows(path: str) -> Iterator[dict]:
    """One row {"text": ...} per .txt file of ``path``, sorted by name; ValueError when there are none."""
    for text in text_files(path):
        yield {"text": text}


def real_text_rows(source: str, tokenizer, tokens: int, *, split: str = "heldout") -> tuple[list[dict], str]:
    """(rows, description): the ``split`` documents of real text ``source`` ("pydoc" or a folder of .txt files)
    joined by blank lines, tokenized once and cut into consecutive rows {"input_ids"} of ``tokens`` ids each (the
    remainder dropped): a corpus of short documents read as the long ones a perplexity sweep needs. ValueError
    when it holds fewer than ``tokens`` tokens."""
    text, what = real_text.corpus(source, split)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"{what} holds {len(ids)} tokens, fewer than the {tokens} the largest length needs: use "
                         "shorter lengths or more text (--text-split all)")
    return [{"input_ids": ids[i:i + tokens]} for i in range(0, len(ids) - tokens + 1, tokens)], what


def dataset_rows(spec: str, *, subset: str | None = None, split: str = "test") -> Iterable[dict]:
    """Rows of a dataset: a ``save_to_disk`` folder, a .jsonl/.json/.parquet file, or a hub name (streamed)."""
    return load_raw(spec, split, subset=subset, streaming=not os.path.exists(spec))


def collect_documents(rows: Iterable[dict], tokenizer, *, min_tokens: int, feature: str | None = None,
                      samples: int | None = None) -> tuple[list[list[int]], int]:
    """(documents, number skipped): token ids without a leading BOS of rows with at least ``min_tokens``,
    the first ``samples`` of them. A row gives pre-tokenized ``input_ids`` or text in ``feature`` (default:
    input_ids if present, else "text"). ValueError if no document is long enough."""
    docs, skipped = [], 0
    bos = tokenizer.bos_token_id
    for row in rows:
        column = feature or ("input_ids" if "input_ids" in row else "text")
        if column not in row:
            raise ValueError(f"the dataset has columns {sorted(row)}: name the text column with --feature")
        value = row[column]
        if isinstance(value, str):
            ids = tokenizer(value, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(x) for x in value]
            if ids and bos is not None and ids[0] == bos:
                ids = ids[1:]  # every window gets its own BOS
        if len(ids) < min_tokens:
            skipped += 1
            continue
        docs.append(ids)
        if samples is not None and len(docs) >= samples:
            break
    if not docs:
        raise ValueError(f"no document has the {min_tokens} tokens the largest length needs ({skipped} were "
                         "shorter): use shorter lengths or longer documents")
    return docs, skipped
