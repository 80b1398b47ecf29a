"""What every command (``reproduce``, ``overlap``, ``evaluate``) does around its work, and the
argument types they share."""

from __future__ import annotations

import argparse
import functools

from .train import flush_subnormals

__all__ = ["command", "whole_number"]


def command(main):
    """Decorate a command's ``main(argv)``: :func:`~upo_ref.lm.train.flush_subnormals` first thing,
    so that every torch thread, started after it, flushes subnormal floats to zero
    (``lm.train.subnormals_flushed`` says why); torch's default is restored afterwards."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None):
        flush_subnormals()
        try:
            return main(argv)
        finally:
            flush_subnormals(False)

    return run


def whole_number(least: int):
    """An argparse ``type``: a whole number >= ``least``, else a usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, got {text!r}")
        return value

    return parse
