r"""The phases of training: what turns a batch into per-example losses, and pi_ref's log-probs.

The loop (``train.train``) knows nothing about losses. A *phase* turns a batch into per-example
losses (B,) and metrics (B,) each:

* :class:`SFTPhase`: the loss is -log pi(y|x) of the SFT target (summed over its tokens, as in the
  DPO reference code; ``average=True`` for the per-token mean);
* :class:`PreferencePhase`: computes log pi(y_w|x), log pi(y_l|x) in one concatenated forward pass,
  looks up log pi_ref(y_w|x), log pi_ref(y_l|x) (computed once, before training, by
  :func:`reference_logps`), and calls the loss through the one interface of every preference
  loss, ``upo_ref.objective.Objective``: ``losses(pc, pr, rc, rr, beta, extras) -> (B,)``.
  ``extras`` holds the pairs' entries of the per-pair tensors the objective names in
  ``extra_keys`` (e.g. the auxiliary rewards R(x, y_w), R(x, y_l) and values V(x) of
  auxiliary-objective UPO), looked up by index exactly like the reference log-probs; the
  objective's own per-example metrics are logged with the phase's. A ``losses.PreferenceLoss`` or
  any callable ``(pc, pr, rc, rr, beta) -> (B,)`` is adapted by ``objective.as_objective``.

Each phase also has ``check_data(split, examples)``, which the loop calls once per run on its
training and eval sets: a preference phase holds them against the pairs its reference log-probs
were computed for (:class:`ReferenceLogps` remembers their fingerprint).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..divergences import Divergence
from ..metrics import preference_metrics
from ..objective import Objective, as_objective, check_extras
from ..utils import cpu
from .config import PRECISIONS
from .logprobs import IGNORE_INDEX, concatenated_logps, sequence_logps
from .tokenize import TokenizedPair, collate_pairs, collate_sequences, fingerprint

__all__ = [
    "NonFiniteLossError",
    "PRECISIONS",
    "autocast",
    "matmul_precision",
    "SFTPhase",
    "PreferencePhase",
    "ReferenceLogps",
    "reference_logps",
]


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/inf loss or gradient norm and stopped before updating the model."""


def autocast(device: torch.device, precision: str = "auto"):
    """The forward passes' precision. ``"auto"``: bf16 autocast on CUDA, float32 on the CPU;
    ``"bfloat16"``: bf16 autocast on any device (on a CPU with AMX, ~4x the float32 matmul rate;
    every matmul's output is rounded to bf16); ``"bfloat16-matmul"``: float32 throughout except
    that the CPU's float32 matmuls round their *inputs* to bf16 and accumulate and return float32
    (:func:`matmul_precision`); ``"float32"``: no autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bfloat16-matmul":
        return matmul_precision(device, precision)
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def matmul_precision(device: torch.device, precision: str):
    """For ``"bfloat16-matmul"``, oneDNN's float32 matmuls on the CPU take bf16-rounded inputs (8
    significant bits) and accumulate and return float32, until the block ends (PyTorch's float32
    matmul precision "medium", ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``; the
    previous setting is restored). Weights, activations, softmax and losses stay float32, and
    pi and pi_ref are computed the same way. The training step runs its backward pass in this
    block too. Any other precision: nothing changes. On a CPU where oneDNN ignores the setting
    (``utils.cpu.bf16_matmul_rounds_inputs``: no AMX) the mode is refused rather than silently
    computed in float32."""
    if precision != "bfloat16-matmul":
        yield
        return
    if device.type != "cpu":
        raise ValueError(
            f'precision "bfloat16-matmul" is a CPU mode (oneDNN); on {device.type} use "auto" '
            f'(bf16 autocast) or "float32"'
        )
    if not cpu.bf16_matmul_rounds_inputs():
        raise ValueError(
            f'precision "bfloat16-matmul" has no effect on this CPU '
            f"({torch.backends.cpu.get_cpu_capability()}): oneDNN computes its float32 matmuls "
            f"in float32 whatever the setting (it rounds their inputs on CPUs with AMX); use "
            f'"float32" (the numbers this CPU would compute) or "bfloat16" (bf16 autocast)'
        )
    with cpu.fp32_matmuls_in_bf16():
        yield


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every tensor of a collated batch on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def check_float32(model) -> None:
    """The trainer's precision policy: float32 weights (autocast, if any, on top of them)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise ValueError(
            f"the model's weights are {sorted(map(str, dtypes))}; the trainer needs float32 "
            "weights (half-precision weights would be updated, and log-probs computed, in that "
            "precision). Load the model in float32 (models.build_model does); on CUDA forward "
            "passes run under bf16 autocast with the log-softmax in float32"
        )


def check_finite(what: str, *tensors: Tensor) -> None:
    """NonFiniteLossError naming ``what`` if any tensor holds NaN or inf."""
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteLossError(f"non-finite {what} ({t.detach().flatten()[:4].tolist()} ...)")


# ------------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------------


@dataclass
class SFTPhase:
    """Supervised fine-tuning on (x, y) = (prompt, chosen) of each example: loss -log pi(y|x), (B,)
    per batch."""

    pad_id: int
    average: bool = False
    response_only: bool = True
    precision: str = "auto"
    name: str = "sft"

    def collate(
        self, examples: Sequence[TokenizedPair], indices: Sequence[int]
    ) -> dict[str, Tensor]:
        batch = collate_sequences(
            [(e.prompt, e.chosen) for e in examples], self.pad_id
        )  # (B, T) each
        batch["index"] = torch.tensor(list(indices), dtype=torch.long)  # (B,)
        return batch

    def losses(
        self, model, batch: dict[str, Tensor], split: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logps = sequence_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            self.average,
            self.response_only,
            batch.get("inputs_embeds"),  # the cached trunk states (trunk_cache.CachedSFTPhase)
        )  # (B,)
        n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)  # (B,)
        return -logps, {"logps/chosen": logps.detach(), "nll_per_token": -logps.detach() / n_tokens}

    def check_data(self, split: str, examples: Sequence[TokenizedPair]) -> None:
        """Nothing to check: SFT needs no per-example data beyond the examples."""


@dataclass
class PreferencePhase:
    """Preference optimisation with an objective (``upo_ref.objective``) against a fixed pi_ref.

    ``loss_fn``: an ``Objective``, a ``losses.PreferenceLoss`` or a callable
    ``(pc, pr, rc, rr, beta) -> (B,)``. ``reference[split]`` = (log pi_ref(y_w|x),
    log pi_ref(y_l|x)), each (N,) over that split's pairs, from :func:`reference_logps`.
    ``extras[split][name]``: the per-pair tensors (N,) the objective names in ``extra_keys``,
    checked here, once. Its metrics' names must not clash with the phase's. ``divergence``: the f
    of the ``scores/*`` metrics (defaults to the objective's own, reverse KL for DPO/IPO).
    ``precision``: the forward passes' (:func:`autocast`). ``starts_at_reference``: the policy
    trained with this phase *is* pi_ref at step 0 (a copy of the model the reference log-probs were
    computed from, in ``train.evaluate``'s batches and the same precision), so ``train.train``
    evaluates step 0 from the reference log-probs (``policy_is_reference``) instead of running the
    model again: the same numbers, one eval pass fewer (``tests/test_partial.py`` checks that they
    agree).
    """

    loss_fn: Objective | Callable[..., Tensor]
    beta: float
    reference: dict[str, tuple[Tensor, Tensor]]
    pad_id: int
    average: bool = False
    response_only: bool = True
    divergence: Divergence | str | None = None
    extras: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    precision: str = "auto"
    starts_at_reference: bool = False
    policy_is_reference: bool = False
    name: str = "preference"

    def __post_init__(self):
        self.objective = as_objective(self.loss_fn)
        check_extras(self.objective, self.extras, {s: len(r[0]) for s, r in self.reference.items()})

    def collate(self, pairs: Sequence[TokenizedPair], indices: Sequence[int]) -> dict[str, Tensor]:
        return collate_pairs(pairs, indices, self.pad_id)  # (2B, T) each, index (B,)

    def losses(
        self, model, batch: dict[str, Tensor], split: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        ref_chosen, ref_rejected = self.reference[split]
        index = batch["index"].cpu()  # (B,)
        if self.policy_is_reference:
            pc, pr = ref_chosen[index], ref_rejected[index]  # (B,), (B,)
        else:
            pc, pr = concatenated_logps(model, batch, self.average, self.response_only)
        rc, rr = ref_chosen[index].to(pc.device), ref_rejected[index].to(pc.device)  # (B,), (B,)
        objective, split_extras = self.objective, self.extras.get(split, {})
        extras = {k: split_extras[k][index].to(pc.device) for k in objective.extra_keys}  # (B,)
        losses = objective.losses(pc, pr, rc, rr, self.beta, extras)  # (B,)
        divergence = self.divergence if self.divergence is not None else objective.divergence
        metrics = preference_metrics(pc.detach(), pr.detach(), rc, rr, self.beta, divergence)
        metrics["logps/chosen"], metrics["logps/rejected"] = pc.detach(), pr.detach()
        with torch.no_grad():
            own = objective.metrics(pc.detach(), pr.detach(), rc, rr, self.beta, extras)
        clash = sorted(set(own) & set(metrics))
        if clash:
            raise ValueError(f"the objective's metrics {clash} clash with the phase's; rename them")
        metrics.update(own)
        return losses, metrics

    def check_data(self, split: str, pairs: Sequence[TokenizedPair]) -> None:
        """The pairs of ``split`` must be those its reference log-probs were computed for: the same
        number, and, for a :class:`ReferenceLogps`, the same fingerprint."""
        if split not in self.reference:
            raise ValueError(
                f"no reference log-probs for the {split!r} split; give reference={{{split!r}: "
                f"reference_logps(model, <its pairs>, ...)}}"
            )
        ref = self.reference[split]
        fix = f"compute them with reference_logps(pi_ref, <the {split} pairs>, ...)"
        if len(ref[0]) != len(pairs):
            raise ValueError(
                f"the {split} set has {len(pairs)} pairs but its reference log-probs were computed "
                f"for {len(ref[0])}; {fix}"
            )
        expected = getattr(ref, "pairs", None)
        if expected is not None and expected != fingerprint(pairs):
            raise ValueError(
                f"the {split} set is not the one its reference log-probs were computed for (same "
                f"size, {len(pairs)}, other pairs); {fix}"
            )


class ReferenceLogps(tuple):
    """(log pi_ref(y_w|x), log pi_ref(y_l|x)), each (N,), and ``pairs``, the fingerprint
    (``tokenize.fingerprint``) of the N pairs they were computed for, which
    :meth:`PreferencePhase.check_data` holds a split's pairs against."""

    def __new__(cls, chosen: Tensor, rejected: Tensor, pairs: str):
        self = super().__new__(cls, (chosen, rejected))
        self.pairs = pairs
        return self

    def __getnewargs__(self):  # copy and pickle rebuild it through __new__
        return (self[0], self[1], self.pairs)


@torch.no_grad()
def reference_logps(
    model,
    pairs: Sequence[TokenizedPair],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    average: bool = False,
    response_only: bool = True,
    collate: Callable | None = None,
    precision: str = "auto",
) -> tuple[Tensor, Tensor]:
    """log pi_ref(y_w|x) and log pi_ref(y_l|x) of every pair, each (N,), float32 on the CPU, as a
    :class:`ReferenceLogps` that remembers which pairs they belong to.

    Computed once, before preference training, with the model in eval mode, in consecutive batches
    of ``batch_size`` (the same batches :func:`evaluate` forms, so that at step 0, where pi =
    pi_ref, the eval margins are exactly 0). ``collate(pairs, indices)`` forms a batch (default
    ``collate_pairs``; pass the phase's own, e.g. ``CachedPreferencePhase.collate``) and
    ``precision`` is the phase's (:func:`autocast`).
    """
    check_float32(model)
    collate = collate or (lambda ps, idx: collate_pairs(ps, idx, pad_id))
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        idx = range(start, min(start + batch_size, len(pairs)))
        batch = to_device(collate([pairs[i] for i in idx], idx), device)
        with autocast(device, precision):
            pc, pr = concatenated_logps(model, batch, average, response_only)  # (b,), (b,)
        chosen.append(pc.float().cpu())
        rejected.append(pr.float().cpu())
    model.train(was_training)
    out = ReferenceLogps(torch.cat(chosen), torch.cat(rejected), fingerprint(pairs))  # (N,) each
    check_finite("reference log-probs", *out)
    return out
