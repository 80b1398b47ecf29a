"""What every command (``reproduce``, ``overlap``, ``evaluate``) does around its work, and the
argument types and options they share."""

from __future__ import annotations

import argparse
import dataclasses
import functools

from .config import ExperimentConfig
from .train import flush_subnormals

__all__ = ["command", "whole_number", "with_data_seed"]


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


def with_data_seed(cfg: ExperimentConfig, seed: int | None) -> ExperimentConfig:
    """``cfg`` drawing its training pairs with data seed ``seed`` (``DataConfig.shuffle_seed``),
    under a name of its own, ``<name>-seed<N>`` (so its own runs/ and results/); ``cfg`` itself
    for None or its own seed. What ``reproduce --data-seed`` and ``overlap --data-seed`` apply."""
    if seed is None or seed == cfg.data.shuffle_seed:
        return cfg
    r = dataclasses.replace
    return r(cfg, data=r(cfg.data, shuffle_seed=seed), name=f"{cfg.name}-seed{seed}")
