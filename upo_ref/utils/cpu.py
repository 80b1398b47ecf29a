"""What this CPU does fast: whether its bf16 matmuls run on kernels of their own.

A partially fine-tuned preset runs its frozen trunk once, in the precision of
``ExperimentConfig.trunk_precision`` (``smol``: bfloat16, for CPUs with AMX or AVX512-BF16). On a
CPU for which oneDNN has no bf16 kernels (an AVX2-only CPU, e.g.) PyTorch computes a bf16 matmul
on a slow fallback path, several times slower than the same matmul in float32
(``python -m upo_ref.bench grid`` times both), so ``lm.trunk_cache.trunk_states`` prints a
warning before such a pass.

The precision ``"bfloat16-matmul"`` (``lm.phases.matmul_precision``) asks oneDNN to round the
inputs of float32 matmuls to bf16. Not every CPU with bf16 kernels does: on one without AMX
(an AVX512-BF16 one, e.g.) oneDNN computes those matmuls in float32 whatever the setting.
:func:`bf16_matmul_rounds_inputs` measures which, and the mode is refused where it would do nothing.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = [
    "bf16_matmul_kernels",
    "fp32_matmuls_in_bf16",
    "bf16_matmul_rounds_inputs",
    "slow_bf16_warning",
]


def bf16_matmul_kernels() -> bool:
    """True if oneDNN has bf16 matmul kernels for this CPU (AVX-512 and up, or AVX2-VNNI-2):
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def fp32_matmuls_in_bf16():
    """oneDNN's float32 matmuls asked to take bf16-rounded inputs until the block ends
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``); the previous setting is restored,
    even when the block raises."""
    backend = torch.backends.mkldnn.matmul
    before = backend.fp32_precision
    backend.fp32_precision = "bf16"
    try:
        yield
    finally:
        backend.fp32_precision = before


@functools.cache
def bf16_matmul_rounds_inputs() -> bool:
    """True if a float32 matmul under ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``
    rounds its inputs to bf16 on this CPU, measured once: a (32, 32) matrix of 1 + 2^-10 (bf16,
    8 significant bits, rounds it to 1) times ones gives 32 in every entry if the inputs are
    rounded, 32 + 2^-5 if not."""
    x = torch.full((32, 32), 1.0 + 2.0**-10)
    with fp32_matmuls_in_bf16():
        y = x @ torch.ones(32, 32)
    return bool((y == 32.0).all())


def slow_bf16_warning(precision: str, device: torch.device, what: str) -> str | None:
    """The warning to print before ``what`` runs in ``precision`` on ``device``, or None: a bf16
    autocast pass on a CPU without bf16 matmul kernels (:func:`bf16_matmul_kernels`)."""
    if precision != "bfloat16" or device.type != "cpu" or bf16_matmul_kernels():
        return None
    return (
        f"warning: {what} runs in bfloat16, but oneDNN has no bf16 matmul kernels for this CPU "
        f"({torch.backends.cpu.get_cpu_capability()}), so each bf16 matmul takes a slow fallback "
        f"path, several times slower than float32 here (python -m upo_ref.bench grid times both)"
    )
