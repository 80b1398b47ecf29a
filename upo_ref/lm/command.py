"""What every command (``reproduce``, ``overlap``, ``evaluate``) does around its work."""

from __future__ import annotations

import functools

from .train import flush_subnormals

__all__ = ["command"]


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
