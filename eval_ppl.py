"""Perplexity of one or more causal LMs at a sweep of context lengths, sequence-parallel.

Every launched process holds the whole model and a piece of each sequence (``--backend``, zigzag ring by
default); one process and CPU work too. Protocols (stated in the CSV header and the plot title):
``truncate`` (default, YaRN's and EasyContext's): each document's first L tokens (BOS included), one pass;
``sliding --stride S``: documents cut to the largest length, L-token windows every S tokens, each token
scored once. Documents shorter than the largest length are skipped (the count is printed).

    # CPU: one process, or two gloo processes sharing each sequence
    python eval_ppl.py --model ./world --dataset ./docs --lengths 256 512 1024
    torchrun --standalone --nproc_per_node 2 eval_ppl.py --model ./world --dataset ./docs --lengths 256 512 1024
    # 8 GPUs (torchrun --nproc_per_node 8 is the same), EasyContext's proof-pile run
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 8 eval_ppl.py \\
        --model PY007/EasyContext-1M-Llama-2-7B --dataset emozilla/proofpile-test-tokenized --samples 2 \\
        --min-length 50000 --max-length 500000 --length-step 50000 --output results/ppl.csv

Writes OUTPUT (CSV: a '# protocol ...' line, then model, protocol, stride, length, documents, tokens, nll,
perplexity), OUTPUT with .json (the settings and every result, saved as each length completes) and the plot
with .png, both over every model in OUTPUT. A rerun with the same OUTPUT and settings evaluates only what is
missing there (another model's results stay); other settings are refused.
"""

from __future__ import annotations

import argparse
import os

from easy_context.train.launch import finish, init_distributed
from easy_context.hf.models import load_config, load_tokenizer
from easy_context.eval.perplexity import (PROTOCOLS, PerplexityResults, add_eval_model_args, check_lengths, check_protocol,
                                     collect_documents, dataset_rows, describe_protocol, eval_dtype,
                                     evaluate_perplexity, int_at_least, length_sweep, load_eval_model, text_dir_rows)

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", action="append", required=True,
                   help="hub name or local path; repeat for several models (one line each)")
    p.add_argument("--tokenizer", help="default: each model's own")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-d", "--dataset", help="hub name, save_to_disk folder, .jsonl or .parquet file; rows with "
                                             "pre-tokenized input_ids or a text column")
    src.add_argument("--text-dir", help="directory of .txt files, one document each (name order)")
    p.add_argument("--subset", help="dataset configuration name")
    p.add_argument("--split", default="test")
    p.add_argument("-f", "--feature", help="text column (default: input_ids if present, else text)")
    p.add_argument("--samples", type=int_at_least(1),
                   help="use the first N documents long enough for the largest length")
    p.add_argument("--lengths", type=int_at_least(2), nargs="+", help="context lengths in tokens (or min/max/step)")
    p.add_argument("--min-length", type=int_at_least(2))
    p.add_argument("--max-length", type=int_at_least(2))
    p.add_argument("--length-step", type=int_at_least(1), help="default: doubling from --min-length")
    p.add_argument("--protocol", choices=PROTOCOLS, default="truncate")
    p.add_argument("--stride", type=int_at_least(1), default=256,
                   help="sliding protocol: tokens between window starts")
    add_eval_model_args(p)
    p.add_argument("--output", default=os.path.join("results", "ppl.csv"), help="CSV path (plot: .png beside it)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    launch = init_distributed()
    lengths = length_sweep(args.lengths, args.min_length, args.max_length, args.length_step)
    dtype = eval_dtype(args.dtype, launch.device)
    stride = args.stride if args.protocol == "sliding" else None
    log = print if launch.is_main else (lambda *a, **k: None)
    # What the numbers depend on (not the backend or the process count): a rerun with these resumes, others are
    # refused. The largest length picks the documents (long enough) and where sliding windows stop.
    settings = dict(protocol=args.protocol, stride=stride, source=args.dataset or args.text_dir, subset=args.subset,
                    split=args.split, feature=args.feature, samples=args.samples, tokenizer=args.tokenizer,
                    dtype=str(dtype).removeprefix("torch."), rope_theta=args.rope_theta,
                    rope_scaling=args.rope_scaling, max_length=max(lengths))
    store = PerplexityResults(args.output, settings)  # every rank reads it before the first collective
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
        source = text_dir_rows(args.text_dir) if args.text_dir else dataset_rows(args.dataset, subset=args.subset,
                                                                                 split=args.split)
        docs, skipped = collect_documents(source, tokenizer, min_tokens=max(lengths) - (bos is not None),
                                          feature=args.feature, samples=args.samples)
        log(f"{name}: {len(docs)} documents, {skipped} skipped as shorter than {max(lengths)} tokens", flush=True)
        header = describe_protocol(args.protocol, stride, bos=bos is not None, source=args.dataset or args.text_dir)
        model = load_eval_model(name, launch.device, backend=args.backend, dtype=dtype, rope_theta=args.rope_theta,
                                rope_scaling=args.rope_scaling, ulysses_degree=args.ulysses_degree)

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
    if launch.is_main:
        from easy_context.eval.plots import perplexity_plot

        csv_path = store.write_csv()
        png = perplexity_plot(store.rows(), os.path.splitext(args.output)[0] + ".png", store.header)
        print(f"{store.header}\nwrote {csv_path} ({len(store.rows())} rows)\n      {store.path}\n      {png}")


if __name__ == "__main__":
    main()
    finish()
