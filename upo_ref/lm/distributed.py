r"""Data-parallel training over several processes, through Accelerate (``accelerate launch``).

``accelerate launch --num_processes 2 [--cpu] -m upo_ref.reproduce ...`` runs the trainer of
:mod:`upo_ref.lm.train` once per process; :func:`data_parallel` notices the launch (the
``WORLD_SIZE`` it sets) and returns the process's :class:`DataParallel`, None in a plain
``python`` run, which imports nothing from Accelerate. What makes N processes one run with the
same global batch as one process:

* every process draws the same global batch (the trainer's stream of example indices depends on
  nothing but its position) and takes its contiguous 1/N of it (:meth:`DataParallel.shard`);
* the forward pass goes through the ``DistributedDataParallel`` wrapper that
  ``Accelerator.prepare`` puts around the model, so that backward averages the gradients over the
  processes; each process's loss is its shard's sum times N / B, so that the average is the
  gradient of the global batch mean, as in one process;
* every process then clips and steps alike, so the models stay equal;
* metric sums are added over the processes with ``Accelerator.reduce`` (:meth:`DataParallel.total`);
  every process evaluates the whole eval set (the models are equal), so eval metrics need none;
* only the main process holds the folder's lock and writes the metrics file and the checkpoint;
* an error in one process's forward pass stops all of them (:meth:`DataParallel.failing_together`).

Equal up to float rounding (the gradient and metric sums are added in another order), and only
without dropout: each process draws its own dropout masks. No collective operation is written here:
the averaging is DDP's, the sums are Accelerate's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch

__all__ = ["data_parallel", "DataParallel", "PhaseForward"]


def _launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@lru_cache(maxsize=1)
def _accelerator():
    from accelerate import Accelerator  # only in a multi-process launch

    return Accelerator()


class PhaseForward(torch.nn.Module):
    """``phase.losses(model, batch, split)`` as a module, so that DDP can wrap the whole forward
    pass (upo_ref's log-probs call the model's body and head separately)."""

    def __init__(self, model: torch.nn.Module, phase):
        super().__init__()
        self.model, self.phase = model, phase

    def forward(self, batch: dict, split: str):
        return self.phase.losses(self.model, batch, split)


class DataParallel:
    """One process's part of a data-parallel run (see the module docstring)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.n_processes = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self._forward = None

    def check_device(self, device: torch.device) -> torch.device:
        """This process's device, if ``device`` (the one asked for) is of its type."""
        if device.type != self.device.type:
            raise ValueError(
                f"this process of the launch runs on {self.device}, but device {device} was asked "
                f"for; launch with --cpu for the CPU, or without it for GPUs"
            )
        return self.device

    def wrap(self, model: torch.nn.Module, phase) -> None:
        """Put ``phase.losses`` of ``model`` inside DDP, for :meth:`forward`."""
        self._forward = self.accelerator.prepare(PhaseForward(model, phase))

    def forward(self, model, batch: dict, split: str):
        """``phase.losses(model, batch, split)`` through DDP (``model`` is the one wrapped)."""
        if self._forward is None or self._forward.module.model is not model:
            raise RuntimeError("DataParallel.forward before wrap(model, phase)")
        return self._forward(batch, split)

    def shard(self, items: Sequence) -> Sequence:
        """This process's contiguous 1/N of a global batch (B must be a multiple of N)."""
        if len(items) % self.n_processes:
            raise ValueError(
                f"a batch of {len(items)} does not split evenly over {self.n_processes} processes; "
                f"make batch_size a multiple of the number of processes"
            )
        b = len(items) // self.n_processes
        return items[self.rank * b : (self.rank + 1) * b]

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all processes (``Accelerator.reduce``)."""
        return self.accelerator.reduce(values, reduction="sum")

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds in any process."""
        return bool(self.total(torch.tensor([float(flag)], device=self.device)) > 0)

    @contextmanager
    def failing_together(self):
        """Where one process fails (a non-finite log-prob, say), all stop, instead of the others
        waiting in the next collective for one that has stopped."""
        error = None
        try:
            yield
        except Exception as err:  # re-raised below, on this process as it was
            error = err
        if self.any(error is not None):
            raise error or RuntimeError(
                "another process of the launch stopped with an error (see its output); this one "
                "stops with it"
            )

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def data_parallel() -> DataParallel | None:
    """This process's :class:`DataParallel` under a launch of several processes, else None."""
    if _launched_processes() <= 1:
        return None
    return DataParallel(_accelerator())
