"""Needle-in-a-haystack heatmap of a causal LM over context lengths x needle depths, sequence-parallel.

Every launched process holds the whole model and a piece of each sequence (``--backend``, zigzag ring by
default), so a 1M-token context fits across GPUs; one process and CPU work too.

    # CPU, the model the main training job writes (output/default/model): one process, or two gloo
    # processes sharing each sequence
    python3 eval_needle.py --model output/default/model --lengths 256 512 1024 --depth-step 25 --samples 2
    torchrun --standalone --nproc_per_node 2 eval_needle.py --model output/default/model --lengths 256 512 1024 \\
        --depth-step 25 --samples 2 --output results/needle/default_2proc.json
    # 8 GPUs (torchrun --nproc_per_node 8 is the same), EasyContext's 1M run on its own prompt; its haystack of
    # essays is a folder of .txt files: add --haystack FOLDER (--haystack pydoc: real text that ships with Python)
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 8 eval_needle.py \\
        --model PY007/EasyContext-1M-Llama-2-7B --min-length 50000 --max-length 1000000 \\
        --length-step 50000 --samples 2 --template easycontext

A length counts every token of the scored sequence (BOS, prompt, needle, question and answer). Writes
OUTPUT (JSON: settings and every scored sample; a rerun with the same OUTPUT and settings skips what is
there, other settings are refused), OUTPUT with .csv, and the heatmap with .png (both show every sample
in OUTPUT; the heatmap's title gives the model and the overall accuracy; OUTPUT_digits.png scores each cell by
the fraction of digits right, partial credit where exact match is all or nothing).

A CEPE model (a directory holding cepe_config.json, what a CEPE training run writes as OUTPUT/model) gets its
needle in the encoder's context only: each cell is a context of C tokens (BOS, the template's prefix, haystack
with the needle at the depth) read by the encoder in chunks, and a --window-token decoder window that continues
the haystack and ends with the question and the answer, scored teacher-forced. The heatmap's lengths are the
context lengths (--contexts). For example, the CEPE demo's model: ``--model output/cepe_demo/main/model --window
256 --contexts 256 1024 --depth-step 25 --samples 2``. Launched processes share each context's chunks.
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
from easy_context.eval.lengths import add_length_args, check_lengths, int_at_least, length_sweep
from easy_context.eval.model import add_eval_model_args, eval_dtype, load_eval_model
from easy_context.eval.needle import (SCORINGS, TEMPLATES, NeedleResults, NeedleTask, add_haystack_args,
                                      depth_sweep, digits_right, haystack_tokens, score)

NOT_FOR_CEPE = {**cepe_eval.NOT_FOR_CEPE,  # flag dest: why
                "scoring": "a CEPE needle is scored teacher-forced, the answer closing the decoder window"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="hub name or local path of a causal LM")
    p.add_argument("--tokenizer", help="hub name or local path (default: the model's)")
    add_haystack_args(p)
    p.add_argument("--haystack-dir", dest="haystack", metavar="FOLDER", help="the same as --haystack FOLDER")
    p.add_argument("--template", choices=list(TEMPLATES), default="default",
                   help="default: the built-in needle, question and answer (what the built-in model is trained "
                        "on); easycontext: EasyContext's 'long story book' prompt, answer = the digits")
    p.add_argument("--key", default="Singapore", help="the needle's key: 'the special magic KEY number'")
    p.add_argument("--digits", type=int_at_least(1), default=7, help="digits of the random number")
    p.add_argument("--samples", type=int_at_least(1), default=5,
                   help="random numbers per cell (the same in every cell)")
    p.add_argument("--seed", type=int, default=0, help="seed of the numbers")
    add_length_args(p)
    p.add_argument("--depths", type=float, nargs="+", help="needle depths in percent, 0-100 (or --depth-step)")
    p.add_argument("--depth-step", type=float, default=10.0, help="percent; depths 0, step, ..., 100")
    p.add_argument("--scoring", choices=SCORINGS, default="forward",
                   help="forward: one teacher-forced sequence-parallel pass, correct only if every answer token "
                        "is the argmax (EasyContext); generate: greedy decoding of the full prompt on each "
                        "process, no sequence parallelism, correct if the first number generated is the "
                        "needle's (small lengths only)")
    add_eval_model_args(p)
    p.add_argument("--output", help="results JSON; its .csv and .png go beside it (default: "
                                    "results/needle/<model name>.json)")
    cepe_eval.add_cepe_args(p, perplexity=False)
    args = quiet_on_other_ranks(p).parse_args(argv)
    args.cepe = cepe_eval.check_cepe_flags(p, argv, [args.model], NOT_FOR_CEPE)
    return args


def main_cepe(args: argparse.Namespace, launch, output: str) -> NeedleResults:
    """The CEPE sweep (module doc) into ``output``, resumable as the plain sweep; returns its results."""
    largest = max(args.contexts or [cepe_eval.CONTEXT_REACH * args.window])
    cfg = cepe_eval.check_model(args.model, window=args.window, chunk_size=args.chunk_size, largest_context=largest,
                                decoder=args.decoder, allow_extrapolation=args.allow_extrapolation)
    chunk = args.chunk_size or cfg.chunk_size
    contexts = cepe_eval.sweep_contexts(args.contexts, args.window, chunk, zero=False)
    depths = depth_sweep(args.depths, args.depth_step)
    dtype = eval_dtype(args.dtype, launch.device)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    hay, haystack = haystack_tokens(tokenizer, max(contexts) + args.window, args.haystack, split=args.text_split)
    task = NeedleTask(tokenizer, hay, template=args.template, key=args.key, digits=args.digits, seed=args.seed)
    cepe_eval.check_needle_sweep(task, contexts, args.window, args.samples)
    settings = dict(model=args.model, tokenizer=args.tokenizer or args.model, decoder=args.decoder,
                    template=args.template, key=args.key, digits=args.digits, seed=args.seed, haystack=haystack,
                    protocol="cepe", window=args.window, chunk_size=chunk, dtype=str(dtype).removeprefix("torch."))
    store = NeedleResults(output, settings)  # every rank reads it before the first collective
    todo = [(c, d, s) for c in contexts for d in depths for s in range(args.samples) if not store.has(c, d, s)]
    if launch.is_main:
        print(f"{len(todo)} of {len(contexts) * len(depths) * args.samples} samples to score ({launch.world} "
              f"process(es), needle in the encoder's context, decoder window {args.window})", flush=True)
    if todo:
        from tqdm import tqdm

        model = load_cepe(args.model, dtype=dtype, device=launch.device, decoder=args.decoder).eval()
        group = dist.group.WORLD if launch.world > 1 else None
        for context, depth, sample in tqdm(todo, disable=not launch.is_main, desc="needle"):
            record = cepe_eval.needle_record(model, task, context=context, window=args.window, depth=depth,
                                             sample=sample, chunk_size=chunk, group=group,
                                             pad_id=tokenizer.pad_token_id or 0)
            if launch.is_main:
                store.add(record)
    return store


def main_plain(args: argparse.Namespace, launch, output: str) -> NeedleResults:
    """The sweep of a causal LM (module doc) into ``output``; returns its results."""
    lengths = length_sweep(args.lengths, args.min_length, args.max_length, args.length_step)
    depths = depth_sweep(args.depths, args.depth_step)
    dtype = eval_dtype(args.dtype, launch.device)
    check_lengths(lengths, load_config(args.model, rope_theta=args.rope_theta, rope_scaling=args.rope_scaling),
                  allow_extrapolation=args.allow_extrapolation, rope_theta=args.rope_theta)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    hay, haystack = haystack_tokens(tokenizer, max(lengths), args.haystack, split=args.text_split)
    task = NeedleTask(tokenizer, hay, template=args.template, key=args.key, digits=args.digits, seed=args.seed)
    task.check(lengths, args.samples)
    settings = dict(model=args.model, tokenizer=args.tokenizer or args.model, template=args.template, key=args.key,
                    digits=args.digits, seed=args.seed, haystack=haystack, scoring=args.scoring,
                    dtype=str(dtype).removeprefix("torch."), rope_theta=args.rope_theta, rope_scaling=args.rope_scaling)
    store = NeedleResults(output, settings)  # every rank reads it before the first collective
    todo = [(n, d, s) for n in lengths for d in depths for s in range(args.samples) if not store.has(n, d, s)]
    if launch.is_main:
        print(f"{len(todo)} of {len(lengths) * len(depths) * args.samples} samples to score "
              f"({launch.world} process(es), {args.scoring} scoring)", flush=True)
    if todo:
        from tqdm import tqdm

        backend = args.backend if args.scoring == "forward" else None
        model = load_eval_model(args.model, launch.device, backend=backend, dtype=dtype,
                                rope_theta=args.rope_theta, rope_scaling=args.rope_scaling,
                                ulysses_degree=args.ulysses_degree, max_length=max(lengths))
        for length, depth, sample in tqdm(todo, disable=not launch.is_main, desc="needle"):
            record = score(model, task, length, depth, sample, args.scoring)
            if launch.is_main:
                store.add(record)
    return store


def main(argv=None) -> None:
    args = parse_args(argv)
    launch = init_distributed()
    parts = os.path.normpath(args.model).split(os.sep)
    name = "/".join(parts[-2:]) if parts[-1] == "model" and len(parts) > 1 else parts[-1]  # train.py's OUT/model
    output = args.output or os.path.join("results", "needle", f"{name.replace('/', '_')}.json")
    if args.cepe:
        store = main_cepe(args, launch, output)
        name = f"{name} (CEPE, window {args.window})"
    else:
        store = main_plain(args, launch, output)
    if launch.is_main:
        from easy_context.eval.plots import needle_heatmap

        stem = os.path.splitext(output)[0]
        csv_path = store.write_csv(stem + ".csv")
        exact, digits = store.accuracy(), store.digit_accuracy()
        png = needle_heatmap(store.records, stem + ".png", f"{name}: accuracy {exact:.1%}")
        digits_png = needle_heatmap(store.records, stem + "_digits.png", f"{name}: digits right {digits:.1%}",
                                    value=lambda r: digits_right(r["number"], r["predicted"]))
        print(f"accuracy {exact:.4f} over {len(store.records)} samples (digits right {digits:.4f})\n"
              f"wrote {output}\n      {csv_path}\n      {png}\n      {digits_png}")


if __name__ == "__main__":
    main()
    finish()
