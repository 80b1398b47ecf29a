"""What this CPU does fast: whether its bf16 matmuls run on kernels of their own.

A partially fine-tuned preset runs its frozen trunk once, in the precision of
``ExperimentConfig.trunk_precision`` (``smol``: bfloat16, for CPUs with AMX or AVX512-BF16). On a
CPU for which oneDNN has no bf16 kernels (an AVX2-only CPU, e.g.) PyTorch computes a bf16 matmul
on a slow fallback path, several times slower than the same matmul in float32
(``python -m upo_ref.bench grid`` times both), so ``lm.trunk_cache.trunk_states`` prints a
warning before such a pass.
"""

from __future__ import annotations

import torch

__all__ = ["bf16_matmul_kernels", "slow_bf16_warning"]


def bf16_matmul_kernels() -> bool:
    """True if oneDNN has bf16 matmul kernels for this CPU (AVX-512 and up, or AVX2-VNNI-2):
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
