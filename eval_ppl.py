"""Perplexity of one or more causal LMs at a sweep of context lengths, sequence-parallel.

Every launched process holds the whole model and a piece of each sequence (``--backend``, zigzag ring by
default); one process and CPU work too. Protocols (stated in the CSV header and the plot title):
``truncate`` (default, YaRN's and EasyContext's): each document's first L tokens (BOS included), one pass;
``sliding --stride S``: documents cut to the largest length, L-token windows every S tokens, each token
scored once. Documents shorter than the largest length are skipped (the count is printed).

    # CPU, the model the main training job writes (output/default/model), on 4 generated documents of 1100
    # tokens written as .txt files (any folder of .txt files works: --text-dir; datasets: --dataset)
    python3 -c "from easy_context.hf.models import load_tokenizer; from easy_context.world import default; \\
        default.save_text_documents('results/docs', load_tokenizer('output/default/model'), 4, 1100)"
    python3 eval_ppl.py --model output/default/model --text-dir results/docs --lengths 256 512 1024
    # real text with no download: the held-out part of the Python standard library's documentation
    python3 eval_ppl.py --model output/default/model --real-text pydoc --lengths 256 512 1024 --samples 4 \\
        --output results/ppl_pydoc.csv
    # the same on two gloo processes sharing each sequence
    torchrun --standalone --nproc_per_node 2 eval_ppl.py --model output/default/model --text-dir results/docs \\
        --lengths 256 512 1024 --output results/ppl_2proc.csv
    # 8 GPUs (torchrun --nproc_per_node 8 is the same), EasyContext's proof-pile run
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 8 eval_ppl.py \\
        --model PY007/EasyContext-1M-Llama-2-7B --dataset emozilla/proofpile-test-tokenized --samples 2 \\
        --min-length 50000 --max-length 500000 --length-step 50000 --output results/ppl.csv

Writes OUTPUT (CSV: a '# protocol ...' line, then model, protocol, stride, length, documents, tokens, nll,
perplexity), OUTPUT with .json (the settings and every result, saved as each length completes) and the plot
with .png, both over every model in OUTPUT. A rerun with the same OUTPUT and settings evaluates only what is
missing there (another model's results stay); other settings are refused.

A CEPE model (a directory holding cepe_config.json, what a CEPE training run writes as OUTPUT/model) is measured
the CEPE paper's way: each document is cut to the largest context + the window, the decoder reads its last
--window tokens and the encoder the --contexts tokens before them (0: the decoder alone), and the perplexity is
that of the window's last --score-tokens tokens, the same tokens at every context. For example, the CEPE demo's
model on the documents above: ``--model output/cepe_demo/main/model --text-dir results/docs --window 256
--contexts 0 256 512 768``. The CSV's columns are then model, window, chunk, context, length (context + window),
documents, tokens, nll, perplexity, and the sweep resumes the same way. Launched processes share each context's
chunks (each encodes its share; the decoder window runs whole on every process).
"""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from easy_context.train.config import HelpFormatter, quiet_on_other_ranks
from easy_context.train.distributed import finish, init_distributed
from easy_context.cepe.io import load_cepe
from easy_context.hf.models import load_config, load_tokenizer
from easy_context.eval import cepe as cepe_eval
from easy_context.eval.documents import collect_documents, dataset_rows, real_text_rows, text_dir_rows
from easy_context.eval.lengths import add_length_args, check_lengths, int_at_least, length_sweep
from easy_context.eval.model import add_eval_model_args, eval_dtype, load_eval_model
from easy_context.parallel.plan import resolve_plan
from easy_context.world.real_text import PYDOC, SPLITS, corpus
from easy_context.eval.perplexity import (PROTOCOLS, PerplexityResults, check_protocol, describe_protocol,
                                          evaluate_perplexity)

_SCORED = "a CEPE model's perplexity is that of the window's last --score-tokens tokens"
NOT_FOR_CEPE = {**cepe_eval.NOT_FOR_CEPE, "protocol": _SCORED, "stride": _SCORED}  # flag dest: why

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("-m", "--model", action="append", required=True,
                   help="hub name or local path; repeat for several models (one line each)")
    p.add_argument("--tokenizer", help="hub name or local path (default: each model's own)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-d", "--dataset", help="hub name, save_to_disk folder, .jsonl or .parquet file; rows with "
                                             "pre-tokenized input_ids or a text column")
    src.add_argument("--text-dir", help="folder of .txt files, one document each (name order)")
    src.add_argument("--real-text", metavar="SOURCE",
                     help=f"real text joined and cut into documents of the largest length: {PYDOC} (the Python "
                          "standard library's documentation: English that ships with Python, no download) or a "
                          "folder of .txt files")
    p.add_argument("--text-split", choices=SPLITS, default="heldout",
                   help="--real-text: which documents, split by name (a model trained on the train part is "
                        "measured on heldout)")
    p.add_argument("--subset", help="hub dataset: its configuration name")
    p.add_argument("--split", default="test", help="hub dataset: the split to read")
    p.add_argument("-f", "--feature", help="column to read (default: input_ids if present, else text)")
    p.add_argument("--samples", type=int_at_least(1),
                   help="use the first N documents long enough for the largest length (default: all)")
    add_length_args(p)
    p.add_argument("--protocol", choices=PROTOCOLS, default="truncate",
                   help="truncate: each document's first L tokens, one pass; sliding: L-token windows every "
                        "--stride tokens, each token scored once")
    p.add_argument("--stride", type=int_at_least(1), default=256,
                   help="sliding protocol: tokens between window starts")
    add_eval_model_args(p)
    p.add_argument("--output", default=os.path.join("results", "ppl.csv"),
                   help="CSV path; its .json (resumable results) and .png plot go beside it")
    cepe_eval.add_cepe_args(p, perplexity=True)
    quiet_on_other_ranks(p)
    args = p.parse_args(argv)
    if args.dataset and _holds_only_text_files(args.dataset):
        p.error(f"--dataset {args.dataset}: a folder of .txt files is read with --text-dir {args.dataset}")
    args.cepe = cepe_eval.check_cepe_flags(p, argv, args.model, NOT_FOR_CEPE)
    return args


def _holds_only_text_files(path: str) -> bool:
    """Whether ``path`` is a folder with .txt files and no dataset files (what --text-dir reads)."""
    if not os.path.isdir(path):
        return False
    kinds = {os.path.splitext(name)[1] for name in os.listdir(path)}
    return ".txt" in kinds and not kinds & {".json", ".jsonl", ".parquet", ".csv", ".arrow"}


def _documents(args: argparse.Namespace, tokenizer, min_tokens: int) -> tuple[list[list[int]], int]:
    """(documents, number skipped): the first --samples documents of the source with ``min_tokens`` tokens."""
    if args.real_text:
        source, _ = real_text_rows(args.real_text, tokenizer, min_tokens, split=args.text_split)
    elif args.text_dir:
        source = text_dir_rows(args.text_dir)
    else:
        source = dataset_rows(args.dataset, subset=args.subset, split=args.split)
    return collect_documents(source, tokenizer, min_tokens=min_tokens, feature=args.feature, samples=args.samples)


def _source_name(args: argparse.Namespace) -> str:
    # Real text is named with its Python version and digest: another Python's docs are another experiment.
    return args.dataset or args.text_dir or corpus(args.real_text, args.text_split)[1]


def main_cepe(args: argparse.Namespace, launch) -> None:
    """The CEPE sweep (module doc) of every --model, resumable in --output as the plain sweep."""
    log = print if launch.is_main else (lambda *a, **k: None)
    window, largest = args.window, max(args.contexts or [cepe_eval.CONTEXT_REACH * args.window])
    score = cepe_eval.default_score_tokens(window, args.score_tokens)
    cepe_eval.check_sweep([], window=window, contexts=[largest], score_tokens=score)  # --score-tokens vs the window
    configs = {name: cepe_eval.check_model(name, window=window, chunk_size=args.chunk_size, largest_context=largest,
                                           decoder=args.decoder, allow_extrapolation=args.allow_extrapolation)
               for name in args.model}  # every model checked before any loads
    dtype = eval_dtype(args.dtype, launch.device)
    source_name = _source_name(args)
    settings = dict(protocol="cepe", window=window, chunk_size=args.chunk_size, score_tokens=score,
                    source=source_name, subset=args.subset, split=args.split, feature=args.feature,
                    samples=args.samples, tokenizer=args.tokenizer, decoder=args.decoder,
                    dtype=str(dtype).removeprefix("torch."), max_context=largest)
    store = cepe_eval.ContextPerplexityResults(args.output, settings)
    chunks = {args.chunk_size or cfg.chunk_size for cfg in configs.values()}
    header = cepe_eval.describe_perplexity(window, chunks.pop() if len(chunks) == 1 else None, score, source_name)
    group = dist.group.WORLD if launch.world > 1 else None
    for name in args.model:
        chunk = args.chunk_size or configs[name].chunk_size
        contexts = cepe_eval.sweep_contexts(args.contexts, window, chunk)
        todo = [c for c in contexts if not store.has(name, c + window)]
        log(f"{name}: {len(todo)} of {len(contexts)} contexts to evaluate", flush=True)
        if not todo:
            continue
        tokenizer = load_tokenizer(args.tokenizer or name)
        docs, skipped = _documents(args, tokenizer, largest + window)
        log(f"{name}: {len(docs)} documents, {skipped} skipped as shorter than {largest + window} tokens", flush=True)
        model = load_cepe(name, dtype=dtype, device=launch.device, decoder=args.decoder).eval()

        def save(row, name=name):  # each context as it completes: a kill keeps what is done
            log(f"{name}  context={row['context']} + window={window}  ppl={row['perplexity']:.4f}  "
                f"({row['tokens']} tokens)")
            if launch.is_main:
                store.add({"model": name, **row}, header)

        from tqdm import tqdm

        with tqdm(total=len(todo) * len(docs), disable=not launch.is_main, desc=os.path.basename(name)) as bar:
            cepe_eval.evaluate_context_perplexity(model, docs, window=window, contexts=todo, chunk_size=chunk,
                                                  score_tokens=score, group=group, pad_id=tokenizer.pad_token_id or 0,
                                                  progress=bar.update, largest_context=largest, on_result=save)
        del model
    _write_plot(store, args.output, launch, title=cepe_eval.PPL_TITLE)


def _write_plot(store: PerplexityResults, output: str, launch, **plot) -> None:
    """On the main process: the CSV and the plot over every row of ``store``, and where they went."""
    if launch.is_main:
        from easy_context.eval.plots import perplexity_plot

        csv_path = store.write_csv()
        png = perplexity_plot(store.rows(), os.path.splitext(output)[0] + ".png", store.header, **plot)
        print(f"{store.header}\nwrote {csv_path} ({len(store.rows())} rows)\n      {store.path}\n      {png}")


def main(argv=None) -> None:
    args = parse_args(argv)
    launch = init_distributed()
    if args.cepe:
        return main_cepe(args, launch)
    lengths = length_sweep(args.lengths, args.min_length, args.max_length, args.length_step)
    dtype = eval_dtype(args.dtype, launch.device)
    stride = args.stride if args.protocol == "sliding" else None
    log = print if launch.is_main else (lambda *a, **k: None)
    # What the numbers depend on (not the backend or the process count): a rerun with these resumes, others are
    # refused. The largest length picks the documents (long enough) and where sliding windows stop.
    source_name = _source_name(args)
    settings = dict(protocol=args.protocol, stride=stride, source=source_name, subset=args.subset,
                    split=args.split, feature=args.feature, samples=args.samples, tokenizer=args.tokenizer,
                    dtype=str(dtype).removeprefix("torch."), rope_theta=args.rope_theta,
                    rope_scaling=args.rope_scaling, max_length=max(lengths))
    store = PerplexityResults(args.output, settings)  # every rank reads it before the first collective
    plan = resolve_plan(args.backend, ulysses_degree=args.ulysses_degree)  # collective: groups once, for every model
    for name in args.model:
        todo = [n for n in lengths if not store.has(name, n)]
        log(f"{name}: {len(todo)} of {len(lengths)} lengths to evaluate", flush=True)
        if not todo:
            continue
        check_lengths(lengths, load_config(name, rope_theta=args.rope_theta, rope_scaling=args.rope_scaling),
                      allow_extrapolation=args.allow_extrapolation, rope_theta=args.rope_theta)
        tokenizer = load_tokenizer(args.tokenizer or name)
        bos = tokenizer.bos_token_id
        check_protocol(lengths, args.protocol, stride, bos=bos is not None)
        docs, skipped = _documents(args, tokenizer, max(lengths) - (bos is not None))
        log(f"{name}: {len(docs)} documents, {skipped} skipped as shorter than {max(lengths)} tokens", flush=True)
        header = describe_protocol(args.protocol, stride, bos=bos is not None, source=source_name)
        model = load_eval_model(name, launch.device, dtype=dtype, rope_theta=args.rope_theta,
                                rope_scaling=args.rope_scaling, max_length=max(lengths), plan=plan)

        def save(r, name=name, header=header):  # each length as it completes: a kill keeps what is done
            log(f"{name}  L={r.length}  ppl={r.perplexity:.4f}  ({r.tokens} tokens)")
            if launch.is_main:
                store.add(dict(model=name, protocol=args.protocol, stride=stride or "", length=r.length,
                               documents=r.documents, tokens=r.tokens, nll=r.nll, perplexity=r.perplexity), header)

        from tqdm import tqdm

        with tqdm(total=len(todo) * len(docs), disable=not launch.is_main, desc=os.path.basename(name)) as bar:
            evaluate_perplexity(model, docs, todo, protocol=args.protocol, stride=stride, bos_id=bos,
                                progress=bar.update, max_length=max(lengths), on_result=save)
        del model
    _write_plot(store, args.output, launch)


if __name__ == "__main__":
    main()
    finish()
