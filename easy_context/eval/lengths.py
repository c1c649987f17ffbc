"""The context lengths of an eval sweep: the sweep itself, its check against the model's position limit, and the
argparse type that refuses nonsense counts at once."""

from __future__ import annotations

import argparse
from typing import Callable, Iterable

from ..hf.models import position_limit


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``low``; argparse reports anything else as a usage error naming the flag."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}; got {value}")
        return value

    parse.__name__ = "integer"  # what argparse calls a value it cannot convert
    return parse


def add_length_args(parser: argparse.ArgumentParser) -> None:
    """The sweep's flags, shared by the evals: ``--lengths``, or ``--min-length``/``--max-length``/``--length-step``."""
    parser.add_argument("--lengths", type=int_at_least(2), nargs="+",
                        help="context lengths in tokens (or --min-length/--max-length/--length-step)")
    parser.add_argument("--min-length", type=int_at_least(2), help="smallest context length of a sweep")
    parser.add_argument("--max-length", type=int_at_least(2), help="largest context length of a sweep")
    parser.add_argument("--length-step", type=int_at_least(1),
                        help="tokens between lengths (default: doubling from --min-length)")


def length_sweep(lengths: Iterable[int] | None = None, min_length: int | None = None,
                 max_length: int | None = None, step: int | None = None) -> list[int]:
    """Sorted distinct lengths: the explicit list, else min..max every ``step`` (no step: doubling from min).
    ValueError, naming the flag, for a length below 2 tokens, min above max, or a step below 1."""
    if lengths:
        out = sorted(set(int(x) for x in lengths))
        if out[0] < 2:
            raise ValueError(f"--lengths must be at least 2 tokens each (one to predict from, one to score); "
                             f"got {out[0]}")
    elif min_length is not None and max_length is not None:
        for flag, n in (("--min-length", min_length), ("--max-length", max_length)):
            if n < 2:  # checked first: doubling from 0 or a negative length never ends
                raise ValueError(f"{flag} must be at least 2 tokens (one to predict from, one to score); got {n}")
        if min_length > max_length:
            raise ValueError(f"--min-length {min_length} is above --max-length {max_length}")
        if step is not None and step < 1:
            raise ValueError(f"--length-step must be at least 1 token (or leave it out to double); got {step}")
        out, n = [], min_length
        while n <= max_length:
            out.append(n)
            n = n + step if step else n * 2
        if not step and out[-1] != max_length:
            out.append(max_length)
    else:
        raise ValueError("give the lengths to evaluate: a list, or a min and max length (and a step)")
    return out


def check_lengths(lengths: Iterable[int], config, *, allow_extrapolation: bool = False,
                  rope_theta: float | None = None) -> None:
    """Raise a ValueError if a length is above the config's position limit (``models.position_limit``),
    unless extrapolation is allowed or the RoPE base was changed by hand (``rope_theta``: limit unknown)."""
    limit = position_limit(config)
    longest = max(lengths)
    if longest <= limit or allow_extrapolation or rope_theta is not None or limit <= 0:
        return
    raise ValueError(f"length {longest} is above the model's position limit of {limit} tokens (max_position_"
                     f"embeddings, times the factor of a RoPE scaling): evaluate at most {limit} tokens, extend the "
                     "RoPE (--rope-scaling yarn:factor=N, or --rope-theta), or pass --allow-extrapolation to "
                     "measure the model beyond its training length on purpose (e.g. a 'before extension' run)")
