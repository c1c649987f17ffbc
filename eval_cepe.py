r"""Evaluate a CEPE model (the OUTPUT/model of a CEPE training run): perplexity of the decoder's last window as the encoder's
context grows (the paper's protocol: window + C context tokens, the loss on the window's last --score-tokens), and
a needle heatmap with the needle only in the encoder's context and the question in the decoder's window.

    # one process (CPU or GPU), generated documents and haystack of the built-in world
    python3 eval_cepe.py --model output/cepe/model --window 256 --output-dir results/cepe
    # the memory spread over 2 processes (each encodes its share of the chunks; the same numbers)
    torchrun --standalone --nproc_per_node 2 eval_cepe.py --model output/cepe/model --window 256 \
        --output-dir results/cepe_2proc

Writes OUTPUT_DIR/ppl.csv and ppl.png (perplexity against window + context tokens), needle.json (every cell;
a rerun with the same settings scores only what is missing), needle.csv, needle.png and needle_digits.png.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from easy_context.cepe.io import load_cepe
from easy_context.eval import cepe as cepe_eval
from easy_context.eval.documents import collect_documents, text_dir_rows
from easy_context.eval.lengths import int_at_least
from easy_context.eval.model import DTYPES, eval_dtype
from easy_context.eval.needle import NeedleResults, depth_sweep, digits_right
from easy_context.eval.plots import needle_heatmap, perplexity_plot
from easy_context.eval.results import write_csv
from easy_context.hf.models import load_tokenizer
from easy_context.train.config import HelpFormatter, quiet_on_other_ranks
from easy_context.train.distributed import finish, init_distributed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="a saved CEPE model directory (OUTPUT/model of a CEPE training run)")
    p.add_argument("--decoder", help="load the frozen decoder from here instead of the path the model records")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on GPU, else float32")
    p.add_argument("--window", type=int_at_least(2), default=cepe_eval.WINDOW, help="decoder tokens")
    p.add_argument("--chunk-size", type=int_at_least(1), help="encoder chunk length (default: the model's)")
    p.add_argument("--contexts", type=int_at_least(0), nargs="+",
                   help=f"encoder context lengths in tokens (default: 0, one chunk, doubling to "
                        f"{cepe_eval.CONTEXT_REACH} x the window)")
    p.add_argument("--score-tokens", type=int_at_least(1),
                   help=f"perplexity over the window's last N tokens (default: min({cepe_eval.SCORE_TOKENS}, "
                        "window / 2))")
    p.add_argument("--text-dir", help="folder of .txt documents (default: generated documents of the built-in world)")
    p.add_argument("--samples", type=int_at_least(1), default=8, help="documents for the perplexity")
    p.add_argument("--needle-contexts", type=int_at_least(1), nargs="+",
                   help="context lengths of the needle sweep (default: --contexts without 0)")
    p.add_argument("--depth-step", type=float, default=10.0, help="needle depths every this many percent")
    p.add_argument("--needle-samples", type=int_at_least(1), default=2, help="needle numbers per cell")
    p.add_argument("--skip-ppl", action="store_true", help="no perplexity sweep")
    p.add_argument("--skip-needle", action="store_true", help="no needle sweep")
    p.add_argument("--output-dir", default="results/cepe", help="where the results go")
    return quiet_on_other_ranks(p).parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    largest = max([*(args.contexts or [cepe_eval.CONTEXT_REACH * args.window]), *(args.needle_contexts or [])])
    # not a CEPE model, a window or chunks that do not fit it: refused before anything loads
    cfg = cepe_eval.check_model(args.model, window=args.window, chunk_size=args.chunk_size, largest_context=largest,
                                decoder=args.decoder)
    chunk = args.chunk_size or cfg.chunk_size
    contexts = cepe_eval.sweep_contexts(args.contexts, args.window, chunk)
    score = cepe_eval.default_score_tokens(args.window, args.score_tokens)
    cepe_eval.check_sweep([], window=args.window, contexts=contexts, score_tokens=score)  # --score-tokens vs window
    depths = depth_sweep(step=args.depth_step)
    launch = init_distributed()
    group = dist.group.WORLD if launch.world > 1 else None
    tokenizer = load_tokenizer(args.model)
    if args.text_dir:
        docs, _ = collect_documents(text_dir_rows(args.text_dir), tokenizer, min_tokens=max(contexts) + args.window,
                                    samples=args.samples)
    else:
        docs = cepe_eval.default_documents(tokenizer, args.samples, max(contexts) + args.window)
    if not args.skip_needle:
        needle_contexts = cepe_eval.sweep_contexts(args.needle_contexts or [c for c in contexts if c], args.window,
                                                   chunk, zero=False)
        task = cepe_eval.needle_task(tokenizer, args.window, max(needle_contexts))
        cepe_eval.check_needle_sweep(task, needle_contexts, args.window, args.needle_samples)
    model = load_cepe(args.model, dtype=eval_dtype(args.dtype, launch.device), device=launch.device,
                      decoder=args.decoder).eval()
    pad = tokenizer.pad_token_id or 0
    out, name = args.output_dir, os.path.basename(os.path.normpath(args.model))
    if not args.skip_ppl:
        rows = cepe_eval.evaluate_context_perplexity(model, docs, window=args.window, contexts=contexts,
                                                     chunk_size=chunk, score_tokens=score, group=group, pad_id=pad)
        caption = cepe_eval.describe_perplexity(args.window, chunk, score, f"{len(docs)} documents of "
                                                f"{args.text_dir or 'generated text of the built-in world'}")
        if launch.is_main:
            rows = [{"model": name, **r} for r in rows]
            write_csv(os.path.join(out, "ppl.csv"), rows, cepe_eval.PPL_COLUMNS, header=caption)
            perplexity_plot(rows, os.path.join(out, "ppl.png"), caption, title=cepe_eval.PPL_TITLE)
            for r in rows:
                print(f"context {r['context']:>7} + window {r['window']}: perplexity {r['perplexity']:.4f}")
    if not args.skip_needle:
        settings = dict(model=os.path.abspath(args.model), window=args.window, chunk=chunk, key=task.key,
                        samples=args.needle_samples, depths=depths)
        results = NeedleResults(os.path.join(out, "needle.json"), settings)
        for c in needle_contexts:
            for d in depths:
                for s in range(args.needle_samples):
                    if results.has(c, d, s):
                        continue
                    record = cepe_eval.needle_record(model, task, context=c, window=args.window, depth=d, sample=s,
                                                     chunk_size=chunk, group=group, pad_id=pad)
                    if launch.is_main:
                        results.add(record)
        if launch.is_main:
            title = f"CEPE needle in the encoder context (decoder window {args.window}): exact"
            results.write_csv(os.path.join(out, "needle.csv"))
            needle_heatmap(results.records, os.path.join(out, "needle.png"), title)
            needle_heatmap(results.records, os.path.join(out, "needle_digits.png"), title.replace("exact", "digits"),
                           value=lambda r: digits_right(r["number"], r["predicted"]))
            print(f"needle: {results.accuracy():.1%} exact, {results.digit_accuracy():.1%} of digits right over "
                  f"{len(results.records)} cells -> {out}/needle.png")
    finish()


if __name__ == "__main__":
    with torch.no_grad():
        main()
