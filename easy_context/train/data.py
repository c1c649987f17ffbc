"""Training data: fixed-length token rows from a pre-tokenized or raw-text dataset, split by data-parallel rank.

Sources: "tiny" (the generated retrieval data of ``world/default.py``), a local ``save_to_disk`` folder, a
.jsonl / .json / .parquet file (or a folder of them), or a hub dataset name. A dataset with an ``input_ids`` column
is used as is (every row must hold at least ``seq_len`` tokens: EasyContext's pre-chunked format); one with
a text column is tokenized with the model's tokenizer and packed into rows of exactly ``seq_len`` tokens
(documents joined with EOS, the remainder dropped).

Every rank of one sequence-parallel group must see the same row: rows are assigned by data-parallel rank
(``ShardedSampler``), never by a seed the ranks happen to share. The sampler resumes mid-epoch.
"""

from __future__ import annotations

import os

import torch

from ..world.default import RetrievalDataset

IDS = "input_ids"
_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_EMPTY_HINT = "pass a --dataset with rows (pre-tokenized input_ids or text), or check that the file was written whole"


def load_raw(source: str, split: str = "train", *, subset: str | None = None, streaming: bool = False):
    """The rows of a ``save_to_disk`` folder, a .jsonl/.json/.parquet/.csv file or folder of them (their one
    split), or a hub dataset (``split`` of ``subset``; ``streaming`` reads it lazily)."""
    import datasets

    if os.path.isdir(source) and any(os.path.exists(os.path.join(source, f))
                                     for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {source!r} has splits {list(ds)}, not {split!r}: choose one of them")
            ds = ds[split]
        return ds
    if os.path.isfile(source):
        kind = _FILE_TYPES.get(os.path.splitext(source)[1])
        if kind is None:
            raise ValueError(f"dataset file {source!r}: use one of {', '.join(_FILE_TYPES)} or a save_to_disk folder")
        return _load_files(source, kind, source)
    if os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if os.path.splitext(f)[1] in _FILE_TYPES)
        if not files:
            raise ValueError(f"dataset folder {source!r} is neither a save_to_disk folder nor holds "
                             f"{'/'.join(_FILE_TYPES)} files")
        kind = _FILE_TYPES[os.path.splitext(files[0])[1]]
        return _load_files(source, kind, [os.path.join(source, f) for f in files])
    return datasets.load_dataset(source, subset, split=split, streaming=streaming)


def _load_files(source: str, kind: str, files):
    import datasets

    try:
        return datasets.load_dataset(kind, data_files=files, split="train")
    except StopIteration:  # datasets' json reader on a file without a row
        raise ValueError(f"dataset {source!r} holds no rows: {_EMPTY_HINT}") from None
    except ValueError as e:
        if "corresponds to no data" not in str(e):
            raise
        raise ValueError(f"dataset {source!r} holds no rows: {_EMPTY_HINT}") from None


def _pack(ds, tokenizer, seq_len: int, column: str, num_proc: int | None):
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("packing raw text needs a tokenizer with an EOS token to separate documents")

    def pack(batch):
        ids = tokenizer(batch[column], add_special_tokens=True)["input_ids"]
        flat = [t for doc in ids for t in (*doc, eos)]
        n = len(flat) // seq_len
        return {IDS: [flat[i * seq_len:(i + 1) * seq_len] for i in range(n)]}

    return ds.map(pack, batched=True, batch_size=1000, remove_columns=ds.column_names, num_proc=num_proc,
                  desc=f"tokenize and pack into {seq_len}-token rows")


def load_training_data(source: str, tokenizer, seq_len: int, *, text_column: str = "text", split: str = "train",
                       seed: int = 0, num_proc: int | None = None, vocab_size: int | None = None):
    """A dataset of rows {"input_ids": LongTensor [>= seq_len]} (see module doc); raises a ValueError that
    names the fix for a missing column, no rows, or a row shorter than ``seq_len`` or holding a token id outside
    [0, ``vocab_size``) (every row checked: ``check_rows``)."""
    if source == "tiny" or source.startswith("tiny:answers"):
        return _tiny_data(source, tokenizer, seq_len, seed)
    ds = load_raw(source, split)
    if len(ds) == 0:
        raise ValueError(f"dataset {source!r} holds no rows: {_EMPTY_HINT}")
    if IDS not in ds.column_names:
        if text_column not in ds.column_names:
            raise ValueError(f"dataset {source!r} has columns {ds.column_names}: it needs a pre-tokenized "
                             f"{IDS!r} column or a text column (--text-column, now {text_column!r})")
        ds = _pack(ds, tokenizer, seq_len, text_column, num_proc)
        if len(ds) == 0:
            raise ValueError(f"dataset {source!r} holds fewer than {seq_len} tokens of text: no training row")
    else:
        ds = ds.select_columns([IDS])
    check_rows(ds, seq_len, vocab_size, source=source)
    return ds.with_format("torch")


def check_rows(ds, seq_len: int, vocab_size: int | None = None, *, source: str = "", batch_rows: int = 8192) -> None:
    """Raise a ValueError naming the first row of ``ds`` (a datasets.Dataset with an input_ids column) that holds
    fewer than ``seq_len`` tokens or a token id outside [0, vocab_size) (None: only >= 0). One vectorized pass
    over the Arrow columns: the lengths come from the list offsets, the id range from one min/max per batch."""
    import pyarrow as pa
    import pyarrow.compute as pc

    checked, short, first_short = 0, 0, None
    for table in ds.with_format("arrow").iter(batch_size=batch_rows):
        col = table.column(IDS)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        lengths = pc.fill_null(pc.list_value_length(col), 0)
        is_short = pc.less(lengths, seq_len)
        n_short = pc.sum(is_short).as_py() or 0
        if n_short and first_short is None:
            i = pc.index(is_short, True).as_py()
            first_short = (checked + i, lengths[i].as_py())
        short += n_short
        checked += len(table)
        if short:  # name the first short row without reading the rest of a large dataset
            row, n = first_short
            raise ValueError(f"dataset {source!r}: {short} of the first {checked} rows hold fewer than --seq-length "
                             f"{seq_len} tokens (first: row {row} holds {n} tokens, fewer than --seq-length "
                             f"{seq_len}); use a shorter --seq-length or a dataset chunked to at least {seq_len} "
                             "tokens per row")
        values = pc.list_flatten(col)
        if len(values) == 0:
            continue
        lo, hi = pc.min_max(values).values()
        if lo.as_py() >= 0 and (vocab_size is None or hi.as_py() < vocab_size):
            continue
        bad = pc.less(values, 0) if vocab_size is None else pc.or_(pc.less(values, 0),
                                                                    pc.greater_equal(values, vocab_size))
        at = pc.index(bad, True).as_py()
        row = checked - len(table) + pc.list_parent_indices(col)[at].as_py()
        allowed = "ids must be >= 0" if vocab_size is None else f"vocab_size {vocab_size}: ids 0-{vocab_size - 1}"
        raise ValueError(f"dataset {source!r}: row {row} holds token id {values[at].as_py()}, outside the model's "
                         f"vocabulary ({allowed}); use a dataset tokenized with this model's tokenizer, or the "
                         "model that the dataset was tokenized for")


def _tiny_data(source: str, tokenizer, seq_len: int, seed: int):
    """The generated retrieval data of ``world/default.py``: "tiny" (loss on every token), "tiny:answers" (on
    the answers only) or "tiny:answers+F" (the answers and a random fraction F of the other tokens)."""
    if source == "tiny":
        return RetrievalDataset(tokenizer, seq_len, seed=seed)
    fraction = source[len("tiny:answers"):]
    try:
        value = float(fraction[1:]) if fraction.startswith("+") else (0.0 if not fraction else None)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise ValueError(f"dataset {source!r}: use tiny, tiny:answers or tiny:answers+F with F in [0, 1] "
                         "(the fraction of non-answer tokens that keep their loss), e.g. tiny:answers+0.05")
    return RetrievalDataset(tokenizer, seq_len, seed=seed, loss_on="answers", text_fraction=value)


class RandomTokens(torch.utils.data.Dataset):
    """Rows of uniform random tokens (row i from seed (seed, i)): for throughput and memory benchmarks."""

    def __init__(self, vocab_size: int, length: int, size: int = 1_000_000, seed: int = 0):
        self.vocab_size, self.length, self.size, self.seed = vocab_size, length, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return {IDS: torch.randint(self.vocab_size, (self.length,), generator=g)}


class ShardedSampler(torch.utils.data.Sampler):
    """Row indices for data-parallel rank ``dp_rank`` of ``dp_size``: a seeded permutation per epoch, split
    into equal interleaved parts (the tail that does not divide is dropped), resumable at any position."""

    def __init__(self, num_rows: int, dp_rank: int, dp_size: int, seed: int = 0):
        if num_rows < dp_size:
            raise ValueError(f"{num_rows} rows cannot feed {dp_size} data-parallel groups: use more data")
        self.num_rows, self.dp_rank, self.dp_size, self.seed = num_rows, dp_rank, dp_size, seed
        self.epoch, self.start = 0, 0

    def rows_per_rank(self) -> int:
        return self.num_rows // self.dp_size

    def set_position(self, epoch: int, start: int) -> None:
        """Continue from ``start`` rows into ``epoch`` (on this rank)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.rows_per_rank() - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_rows, generator=g)[: self.rows_per_rank() * self.dp_size]
        yield from perm[self.dp_rank::self.dp_size][self.start:].tolist()


def collate(seq_len: int):
    """A collate function stacking rows' first ``seq_len`` tokens into ids [B, seq_len], and their "labels"
    (-100: no loss) into labels [B, seq_len] (None when rows have none: the loss is on every token)."""
    def fn(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = torch.stack([torch.as_tensor(r[IDS][:seq_len], dtype=torch.long) for r in rows])
        if "labels" not in rows[0]:
            return ids, None
        return ids, torch.stack([torch.as_tensor(r["labels"][:seq_len], dtype=torch.long) for r in rows])
    return fn


def batches(dataset, sampler: ShardedSampler, batch_size: int, seq_len: int, num_workers: int = 0):
    """Endless batches from ``sampler``'s position on, epoch after epoch; yields (epoch, row, (ids, labels))
    (see ``collate``) with ``row`` the sampler position after this batch (save it to resume)."""
    if sampler.rows_per_rank() < batch_size:
        raise ValueError(f"{sampler.rows_per_rank()} rows per data-parallel rank cannot fill a batch of {batch_size}: "
                         "use more data or a smaller --batch-size")
    while True:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                             collate_fn=collate(seq_len), num_workers=num_workers)
        row = sampler.start
        for batch in loader:
            row += batch_size
            yield sampler.epoch, row, batch
        sampler.set_position(sampler.epoch + 1, 0)
