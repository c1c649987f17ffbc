"""Training data: fixed-length token rows from a pre-tokenized, raw-text or instruction dataset, split by
data-parallel rank.

Sources: "tiny" (the generated retrieval data of ``world/default.py``), "tiny:instructions" (the generated long
instructions of ``world/instructions.py``), a local ``save_to_disk`` folder, a .jsonl / .json / .parquet file
(or a folder of them), or a hub dataset name. A dataset with an ``input_ids`` column is used as is (every row
must hold at least ``seq_len`` tokens: EasyContext's pre-chunked format); one with a text column is tokenized
with the model's tokenizer and packed into rows of exactly ``seq_len`` tokens (documents joined with EOS, the
remainder dropped). Instruction rows (instruction/input/output or chat messages: ``instructions.py``) become
examples with labels on the responses only, packed into rows with position ids that restart at each example
(``packing.py``) or one per row, padded; an example longer than ``seq_len`` is dropped and counted, never cut.

Every rank of one sequence-parallel group must see the same row: rows are assigned by data-parallel rank
(``ShardedSampler``), never by a seed the ranks happen to share. The sampler resumes mid-epoch.
"""

from __future__ import annotations

import os

import torch

from ..parallel.plan import ParallelPlan
from ..world.default import RetrievalDataset
from ..world.instructions import instruction_examples
from . import instructions
from .packing import ExampleRows, pack_lengths

IDS = "input_ids"
TINY_INSTRUCTIONS = "tiny:instructions"
TINY_INSTRUCTION_COUNT = 512  # generated examples of tiny:instructions
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
                       seed: int = 0, num_proc: int | None = None, vocab_size: int | None = None,
                       prompt_format: str = "auto", packing: bool = True, ignore_columns: tuple[str, ...] = ()):
    """A dataset of rows {"input_ids": LongTensor [>= seq_len]} (+ "labels", and "position_ids" for packed
    instruction data; see module doc); raises a ValueError that names the fix for a missing column, no rows, a
    row shorter than ``seq_len`` or holding a token id outside [0, ``vocab_size``) (every row checked:
    ``check_rows``), or bad instruction data. ``prompt_format``, ``packing`` and ``ignore_columns`` apply to
    instruction data only: ``instructions.tokenize_examples`` and ``instruction_rows``."""
    sft_options = prompt_format != "auto" or not packing or bool(ignore_columns)
    if source == "tiny" or source.startswith("tiny:answers"):  # needs no datasets package
        _no_sft_options(source, sft_options, "generated retrieval rows")
        return _tiny_data(source, tokenizer, seq_len, seed)
    import datasets

    if source == TINY_INSTRUCTIONS:
        # lengths up to 7/8 of a row: the prompt format's own tokens fit the rest
        rows = instruction_examples(tokenizer, TINY_INSTRUCTION_COUNT, max(1, seq_len * 7 // 8), seed=seed)
        return instruction_rows(datasets.Dataset.from_list(rows), tokenizer, seq_len, source=source,
                                prompt_format=prompt_format, packing=packing, ignore_columns=ignore_columns,
                                vocab_size=vocab_size)
    ds = load_raw(source, split)
    if len(ds) == 0:
        raise ValueError(f"dataset {source!r} holds no rows: {_EMPTY_HINT}")
    if instructions.is_instruction_data(ds.column_names):
        return instruction_rows(ds, tokenizer, seq_len, source=source, prompt_format=prompt_format, packing=packing,
                                ignore_columns=ignore_columns, vocab_size=vocab_size, num_proc=num_proc)
    _no_sft_options(source, sft_options, f"columns {ds.column_names}")
    if IDS not in ds.column_names:
        if text_column not in ds.column_names:
            raise ValueError(f"dataset {source!r} has columns {ds.column_names}: it needs a pre-tokenized "
                             f"{IDS!r} column, a text column (--text-column, now {text_column!r}) or instruction "
                             "columns (instruction/input/output or messages)")
        ds = _pack(ds, tokenizer, seq_len, text_column, num_proc)
        if len(ds) == 0:
            raise ValueError(f"dataset {source!r} holds fewer than {seq_len} tokens of text: no training row")
    else:
        ds = ds.select_columns([c for c in (IDS, "labels") if c in ds.column_names])  # labels: loss where given
    check_rows(ds, seq_len, vocab_size, source=source)
    return ds.with_format("torch")


def _no_sft_options(source: str, given: bool, what: str) -> None:
    if given:
        raise ValueError(f"--prompt-format, --one-example-per-row and --ignore-columns apply to instruction data; "
                         f"dataset {source!r} holds {what}: leave them out, or pass instruction rows "
                         "(instruction/input/output or messages)")


def instruction_rows(ds, tokenizer, seq_len: int, *, source: str = "", prompt_format: str = "auto",
                     packing: bool = True, ignore_columns: tuple[str, ...] = (), vocab_size: int | None = None,
                     num_proc: int | None = None) -> ExampleRows:
    """``ds``'s instruction rows as training rows of ``seq_len`` tokens: examples formatted and labelled
    (``instructions.tokenize_examples``), those longer than ``seq_len`` dropped and counted, the rest packed with
    restarting position ids (``packing``) or one per row; right-padded. Its ``summary`` says what was done."""
    examples, fmt = instructions.tokenize_examples(ds, tokenizer, prompt_format, source=source,
                                                   ignore_columns=ignore_columns, num_proc=num_proc)
    check_token_ids(examples, vocab_size, source=source)
    lengths, loss_tokens = list(examples["length"]), list(examples["loss_tokens"])
    keep = [i for i, n in enumerate(lengths) if n <= seq_len]
    dropped = len(lengths) - len(keep)
    if not keep:
        raise ValueError(f"dataset {source!r}: all {len(lengths)} examples are longer than --seq-length {seq_len} "
                         f"tokens (the shortest holds {min(lengths)}): raise --seq-length")
    groups = pack_lengths([lengths[i] for i in keep], seq_len) if packing else [[i] for i in range(len(keep))]
    groups = [[keep[i] for i in g] for g in groups]
    tokens, loss = sum(lengths[i] for i in keep), sum(loss_tokens[i] for i in keep)
    layout = "packed with restarting position ids" if packing else "one per row, padded"
    cut = (f"{dropped} longer than --seq-length {seq_len} dropped (the longest holds {max(lengths)} tokens), "
           if dropped else "")
    summary = (f"instruction data {source!r}: {len(lengths)} examples ({cut}prompt format {fmt}) in {len(groups)} "
               f"rows of {seq_len} tokens, {layout}: {tokens / (len(groups) * seq_len):.0%} of the tokens are "
               f"examples, {loss / (len(groups) * seq_len):.0%} carry loss")
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    return ExampleRows(examples, groups, seq_len, pad_id, packed=packing, summary=summary, dropped=dropped)


def restarts_positions(dataset) -> bool:
    """Whether ``dataset``'s rows carry position ids that restart (packed examples): attention must honour them."""
    return isinstance(dataset, ExampleRows) and dataset.packed


def check_packed_rows(dataset, plan: ParallelPlan, *, pose: bool = False, device: torch.device | None = None) -> None:
    """Collective over ``plan``'s SP group when ``dataset`` packs examples (``restarts_positions``): SystemExit
    saying to add --one-example-per-row when the job cannot keep them apart: PoSE (it draws its own positions),
    S²-Attn (its shifted groups span examples), or a plan that refuses restarting positions (tried on row 0)."""
    if not restarts_positions(dataset):
        return
    fix = "add --one-example-per-row (one example per row, padded)"
    if pose:
        raise SystemExit("--pose-target draws each row's positions, and packed instruction data needs its own "
                         f"(restarting at each example): {fix}, or leave out --pose-target")
    if not plan.backend.exact:
        raise SystemExit(f"--backend {plan.backend.name}: S²-Attn's shifted groups would attend across the packed "
                         f"examples of a row: {fix}, or use an exact backend")
    row = dataset[0]
    try:
        plan.shard_inputs(*(row[k][None].to(device) for k in (IDS, "labels", "position_ids")))
    except ValueError as e:
        raise SystemExit(f"packed instruction data: --backend {plan.backend.name} cannot keep the examples of a row "
                         f"apart ({e}): {fix}") from None


def check_rows(ds, seq_len: int, vocab_size: int | None = None, *, source: str = "", batch_rows: int = 8192) -> None:
    """Raise a ValueError naming the first row of ``ds`` (a datasets.Dataset with an input_ids column) that holds
    fewer than ``seq_len`` tokens or a token id outside [0, vocab_size) (None: only >= 0). One vectorized pass
    over the Arrow columns: the lengths come from the list offsets, the id range from one min/max per batch."""
    import pyarrow.compute as pc

    checked, short, first_short = 0, 0, None
    for table in ds.with_format("arrow").iter(batch_size=batch_rows):
        col = _ids_column(table)
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
        _check_id_range(col, vocab_size, checked - len(table), source)


def check_token_ids(ds, vocab_size: int | None = None, *, source: str = "", batch_rows: int = 8192) -> None:
    """Raise a ValueError naming the first row of ``ds`` (with an input_ids column) holding a token id outside
    [0, vocab_size) (None: only >= 0)."""
    checked = 0
    for table in ds.with_format("arrow").iter(batch_size=batch_rows):
        _check_id_range(_ids_column(table), vocab_size, checked, source)
        checked += len(table)


def _ids_column(table):
    import pyarrow as pa

    col = table.column(IDS)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _check_id_range(col, vocab_size: int | None, first_row: int, source: str) -> None:
    import pyarrow.compute as pc

    values = pc.list_flatten(col)
    if len(values) == 0:
        return
    lo, hi = pc.min_max(values).values()
    if lo.as_py() >= 0 and (vocab_size is None or hi.as_py() < vocab_size):
        return
    bad = pc.less(values, 0) if vocab_size is None else pc.or_(pc.less(values, 0), pc.greater_equal(values, vocab_size))
    at = pc.index(bad, True).as_py()
    row = first_row + pc.list_parent_indices(col)[at].as_py()
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
    """A collate function stacking rows' first ``seq_len`` tokens into (ids, labels, positions), each
    [B, seq_len]: labels from the rows' "labels" (-100: no loss; None when rows have none: the loss is on every
    token), positions from their "position_ids" (None when rows have none: each row is one document from 0)."""
    def stack(rows: list[dict], key: str) -> torch.Tensor | None:
        if key not in rows[0]:
            return None
        return torch.stack([torch.as_tensor(r[key][:seq_len], dtype=torch.long) for r in rows])

    def fn(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return stack(rows, IDS), stack(rows, "labels"), stack(rows, "position_ids")
    return fn


def batches(dataset, sampler: ShardedSampler, batch_size: int, seq_len: int, num_workers: int = 0):
    """Endless batches from ``sampler``'s position on, epoch after epoch; yields (epoch, row, (ids, labels,
    positions)) (see ``collate``) with ``row`` the sampler position after this batch (save it to resume)."""
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
