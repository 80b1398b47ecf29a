r"""upo_ref's losses in TRL's ``DPOTrainer``: IUPO, f-DPO with a stable f', DPO, IPO.

Written against TRL 1.16.0 (pinned in requirements.txt). TRL 1.x has no loss hook: since 0.29
(which removed ``dpo_loss``) ``DPOTrainer._compute_loss`` runs the forward pass and then picks the
loss in an if-chain on ``loss_type``. :class:`UPOTrainer` overrides ``compute_loss``, the method
``transformers.Trainer`` documents for custom losses (``DPOTrainer`` overrides it too, to call
``_compute_loss``). A TRL user writes::

    from trl import DPOConfig
    from upo_ref import PreferenceLoss
    from upo_ref.integrations.trl import UPOTrainer

    trainer = UPOTrainer(model, ref_model, DPOConfig("out", beta=0.1), train_dataset=ds,
                         processing_class=tokenizer, loss=PreferenceLoss("iupo", "jensen_shannon"))
    trainer.train()

What stays TRL's: the data pipeline (prompt/chosen/rejected rows, chat templates, EOS, max_length
truncation, the collator), the reference model (``ref_model``, a PEFT adapter switched off,
``precompute_ref_log_probs``, ``sync_ref_model``), the fused LM head, Accelerate/DeepSpeed/FSDP,
logging, checkpoints. What is upo_ref's: log pi(y|x) summed over the completion tokens (never
averaged; TRL's own ``ipo`` divides by the length, upo_ref's IPO is eq. 10 of summed log-probs) and
the loss, ``loss(pc, pr, rc, rr, beta).mean()`` with ``beta = args.beta``.

Logged per step (averaged over all processes): ``loss`` and TRL's ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (DPO's implicit rewards, the same
for every loss), ``logps/chosen``, ``logps/rejected``, plus upo_ref's ``scores/chosen``,
``scores/rejected``, ``scores/margins`` (beta f'(pi/pi_ref) of the loss's divergence). As
everywhere in upo_ref, ``rewards/accuracies`` counts a tie as half (TRL's own trainer counts it as
0). TRL's ``entropy``, ``logits/*`` and ``mean_token_accuracy`` are not logged.

A config that says something else than the loss is refused (:func:`check_config`), and so is a
dataset row without ``prompt``, ``chosen`` or ``rejected`` (:func:`check_dataset`).
"""

from __future__ import annotations

import math

import torch
from trl import DPOConfig, DPOTrainer

from ..divergences import Divergence
from ..lm.logprobs import IGNORE_INDEX
from ..losses import PreferenceLoss
from ..metrics import preference_metrics

__all__ = ["UPOTrainer", "TRL_DIVERGENCE_NAMES", "check_config", "check_dataset"]

# TRL's f_divergence_type of each upo_ref divergence that TRL has (chi-squared and total variation
# it has not).
TRL_DIVERGENCE_NAMES = {
    "reverse_kl": "reverse_kl",
    "forward_kl": "forward_kl",
    "jensen_shannon": "js_divergence",
    "alpha": "alpha_divergence",
}
# TRL's loss_type values that name the same loss as a upo_ref loss. TRL's defaults, loss_type
# "sigmoid" and f_divergence_type "reverse_kl", cannot be told apart from values set on purpose and
# are accepted with every upo_ref loss.
TRL_LOSS_TYPES = {"dpo": "sigmoid", "fdpo": "sigmoid", "ipo": "ipo", "iupo": "ipo"}
TRL_DEFAULT_LOSS_TYPE, TRL_DEFAULT_DIVERGENCE = "sigmoid", "reverse_kl"
# TRL's alpha coefficient must equal 1 - upo_ref's alpha to this tolerance (both are user floats).
ALPHA_MATCH_TOL = 1e-12
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
# Batch keys that are not model inputs (DPOTrainer's own list).
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def _check_divergence(loss: PreferenceLoss, args: DPOConfig) -> None:
    trl_name = args.f_divergence_type
    if trl_name == TRL_DEFAULT_DIVERGENCE:
        return  # TRL's default: read as not set (and right for DPO, IPO and reverse-KL losses)
    div: Divergence | None = loss.divergence
    if div is None:
        raise ValueError(
            f"DPOConfig(f_divergence_type={trl_name!r}) conflicts with the upo_ref loss "
            f"{loss.label}, which is defined with reverse KL; for another divergence use "
            f"PreferenceLoss({'fdpo' if loss.name == 'dpo' else 'iupo'!r}, <divergence>)"
        )
    ours = div.name
    if TRL_DIVERGENCE_NAMES.get(ours) != trl_name:
        raise ValueError(
            f"DPOConfig(f_divergence_type={trl_name!r}) conflicts with the upo_ref loss "
            f"{loss.label} (divergence {ours!r}, TRL's name "
            f"{TRL_DIVERGENCE_NAMES.get(ours, 'none: TRL has no such divergence')!r}); "
            f"make them agree or leave f_divergence_type at its default"
        )
    if ours == "alpha":
        coef = args.f_alpha_divergence_coef
        if not math.isclose(coef, 1.0 - div.alpha, rel_tol=0.0, abs_tol=ALPHA_MATCH_TOL):
            raise ValueError(
                f"DPOConfig(f_alpha_divergence_coef={coef!r}) conflicts with the upo_ref loss "
                f"{loss.label}: TRL (since 0.29) computes f'(u) = (u^(coef-1) - 1)/(coef-1), "
                f"so its coef is 1 - alpha of f-DPO's (and upo_ref's) "
                f"f'(u) = (1 - u^-alpha)/alpha; alpha={div.alpha:g} is coef={1.0 - div.alpha:g}"
            )


def _require_preference_loss(loss) -> None:
    if not isinstance(loss, PreferenceLoss):
        raise TypeError(
            f"loss must be a upo_ref.losses.PreferenceLoss, e.g. PreferenceLoss('iupo', "
            f"'jensen_shannon'), got {type(loss).__name__}"
        )


def check_config(loss: PreferenceLoss, args: DPOConfig) -> None:
    """Raise ValueError where ``args`` asks TRL for something else than ``loss`` computes.

    ``loss_type`` must be one value, TRL's default ``"sigmoid"`` or the TRL name of the same loss
    (``"sigmoid"`` for DPO and f-DPO, ``"ipo"`` for IPO and IUPO); ``f_divergence_type`` TRL's
    default ``"reverse_kl"`` or the TRL name of the loss's divergence, with, for the
    alpha-divergence, ``f_alpha_divergence_coef = 1 - alpha`` (TRL's convention since 0.29).
    LD-DPO (``ld_alpha``), WPO weights (``use_weighting``) and several weighted loss types change
    the log-probs or the loss and are refused.
    """
    _require_preference_loss(loss)
    types = list(args.loss_type)
    if len(types) != 1:
        raise ValueError(
            f"DPOConfig(loss_type={types}) combines several TRL losses; UPOTrainer trains with one "
            f"upo_ref loss ({loss.label}): set loss_type to {TRL_LOSS_TYPES[loss.name]!r} or leave "
            f"it at its default"
        )
    if types[0] not in (TRL_DEFAULT_LOSS_TYPE, TRL_LOSS_TYPES[loss.name]):
        raise ValueError(
            f"DPOConfig(loss_type={types[0]!r}) conflicts with the upo_ref loss {loss.label}, "
            f"whose TRL counterpart is {TRL_LOSS_TYPES[loss.name]!r}; make them agree or leave "
            f"loss_type at its default"
        )
    _check_divergence(loss, args)
    if args.ld_alpha is not None:
        raise ValueError(
            f"DPOConfig(ld_alpha={args.ld_alpha}) reweights the log-probs (LD-DPO); upo_ref's "
            f"losses take log-probs summed over the completion: set ld_alpha=None"
        )
    if args.use_weighting:
        raise ValueError(
            "DPOConfig(use_weighting=True) multiplies the loss by WPO weights, which is not the "
            f"upo_ref loss {loss.label}: set use_weighting=False"
        )


_FORMAT_HINT = (
    "every row needs 'prompt', 'chosen' and 'rejected' (TRL's explicit-prompt preference format; a "
    "dataset with the prompt inside chosen/rejected converts with dataset.map(trl.extract_prompt))"
)


def _check_row(row: dict, index: int, name: str) -> None:
    missing = [k for k in REQUIRED_COLUMNS if row.get(k) is None]
    if missing:
        raise ValueError(
            f"{name}: row {index} has no {', '.join(repr(k) for k in missing)}; {_FORMAT_HINT}"
        )


def check_dataset(dataset, name: str = "train_dataset") -> None:
    """Raise ValueError naming the first row of ``dataset`` (a ``datasets.Dataset``, or a dict of
    them) without a ``prompt``, ``chosen`` or ``rejected`` value (a missing column, or None).

    An ``IterableDataset`` cannot be read ahead: only its first row is checked here."""
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_dataset(part, f"{name}[{key!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None or not hasattr(dataset, "__len__"):
        _check_row(next(iter(dataset)), 0, name)
        return
    absent = [k for k in REQUIRED_COLUMNS if k not in columns]
    if absent:
        raise ValueError(
            f"{name} has no column {', '.join(repr(k) for k in absent)} (its columns: {columns}); "
            f"{_FORMAT_HINT}"
        )
    for i, values in enumerate(zip(*(dataset[k] for k in REQUIRED_COLUMNS), strict=True)):
        if any(v is None for v in values):
            _check_row(dict(zip(REQUIRED_COLUMNS, values, strict=True)), i, name)


class UPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with a upo_ref loss; every argument is ``DPOTrainer``'s, plus ``loss``.

    ``loss``: a :class:`~upo_ref.losses.PreferenceLoss` (DPO, IPO, f-DPO or IUPO in either form,
    any divergence). ``args.beta`` is its beta. Checked against ``args`` by :func:`check_config`;
    the datasets by :func:`check_dataset`.
    """

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *a, loss, **kw):
        _require_preference_loss(loss)
        if args is not None:  # None: TRL's default config, which agrees with every loss
            check_config(loss, args)
        for key in ("train_dataset", "eval_dataset"):
            if kw.get(key) is not None:
                check_dataset(kw[key], key)
        self.upo_loss = loss
        super().__init__(model, ref_model, args, *a, **kw)
        if self.aux_loss_enabled:
            raise ValueError(
                "this Mixture-of-Experts model adds a router auxiliary loss, which UPOTrainer does "
                "not combine with the upo_ref loss: set DPOConfig(router_aux_loss_coef=0.0)"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean upo_ref loss of the batch (2B rows: B chosen, then B rejected); logs the metrics."""
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]  # (2B, T)
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)  # (2B, T)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        # log_probs: (2B, T-1), 0 where the label is IGNORE_INDEX; prompt-learning PEFT prepends
        # virtual tokens, so keep the last T-1 positions.
        seq_len = completion_mask.shape[1] - 1
        logps = outputs.log_probs[:, -seq_len:].float().sum(dim=1)  # (2B,)
        pc, pr = logps.chunk(2, dim=0)  # (B,), (B,)
        if self.precompute_ref_logps:
            rc, rr = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]  # (B,), (B,)
        else:
            ref = self.ref_model if self.ref_model is not None else self.model  # PEFT: adapter off
            rc, rr = self.compute_ref_log_probs(ref, inputs)  # (B,), (B,)
        rc, rr = rc.float(), rr.float()
        loss = self.upo_loss(pc, pr, rc, rr, self.beta).mean()
        self._log_metrics(mode, pc.detach(), pr.detach(), rc, rr)
        if return_outputs:  # TRL's (deprecated) path for compute_metrics: logits need a forward
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    @torch.no_grad()
    def _log_metrics(self, mode: str, pc, pr, rc, rr) -> None:
        """Append the batch means of the metrics, over all processes, to TRL's ``_metrics``, which
        ``DPOTrainer.log`` averages over the steps between two log lines."""
        metrics = preference_metrics(pc, pr, rc, rr, self.beta, self.upo_loss.divergence)
        metrics["logps/chosen"], metrics["logps/rejected"] = pc, pr
        names = list(metrics)
        stacked = torch.stack([metrics[k] for k in names], dim=1)  # (B, K)
        means = self.accelerator.gather_for_metrics(stacked).mean(dim=0).tolist()  # (K,)
        for name, value in zip(names, means, strict=True):
            self._metrics[mode][name].append(value)
