r"""Auxiliary-objective UPO on a language model, through the training pipeline of ``upo_ref.lm``.

``upo_ref.auxiliary.losses`` has the losses (Badrinath et al., arXiv 2405.17956):

.. math::

    L_{UPO} = L_{DPO} + \gamma\,\tfrac12\big[L_\pi(x, y_w) + L_\pi(x, y_l)\big], \qquad
    L_\pi(x, y) = -\,w\big(R(x, y) - V_\theta(x)\big)\log\pi_\phi(y \mid x).

:func:`run_aux_experiment` runs them on HH-RLHF with a causal language model, for the configs of
:func:`aux_lm_config`: the data and the SFT reference policy of ``lm.experiment``, the auxiliary
rewards of every response (``auxiliary.scoring``), the value network (``auxiliary.values``), one
preference run per loss (``auxiliary.objectives``: DPO, UPO-DPO, MODPO, called by the trainer
through ``upo_ref.objective.Objective`` with R(x, y_w), R(x, y_l), V(x) as per-pair extras), and
the evaluation of every model before and after training (``auxiliary.evaluation``).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..lm.config import TINY_GPT2, DataConfig, ExperimentConfig, ModelConfig, PhaseConfig
from ..lm.experiment import ExperimentData, Reference, load_experiment_data, prepare_reference
from ..lm.models import default_device
from ..lm.phases import PreferencePhase
from ..lm.train import METRICS, read_metrics, train
from .evaluation import AuxEvaluation, AuxRun, HeldOutSet, evaluate_aux
from .objectives import MODPOLoss, UPODPOLoss, aux_extras
from .sampling import generation_prompts
from .scoring import Reward, TextReward, pair_rewards
from .values import PromptValues, fit_prompt_values, prompt_features

__all__ = ["AuxLMConfig", "aux_lm_config", "AuxExperiment", "run_aux_experiment"]


@dataclass(frozen=True)
class AuxLMConfig:
    """The language-model experiment: a model, HH data, SFT (pi_ref) and the preference phase of
    every run, which are DPO (gamma = 0), UPO-DPO at each positive gamma and MODPO at each w_aux;
    then DPO and UPO-DPO again with the preference phase's seed replaced by each of ``extra_seeds``.
    Those runs differ from the first ones only in the order the training pairs come in: DPO against
    DPO measures training noise, and UPO against DPO of the same seed is a second, independent
    estimate of UPO's effect.

    ``alpha``: UPO's advantage temperature, in the reward's units (readability: hundreds of Flesch
    points; the responses' rewards have a standard deviation of about 0.2 on HH). ``value_*``: the
    value network (hidden sizes, Adam steps, learning rate, expectile tau). ``n_generation_prompts``
    held-out prompts get one sampled response of at most ``max_new_tokens`` tokens each.
    """

    name: str
    model: ModelConfig
    data: DataConfig
    sft: PhaseConfig
    pref: PhaseConfig
    beta: float = 0.1
    alpha: float = 0.2
    gammas: tuple[float, ...] = (0.0, 0.1)
    modpo_w_aux: tuple[float, ...] = (0.5,)
    extra_seeds: tuple[int, ...] = (1,)
    value_hidden_sizes: tuple[int, ...] = ()
    value_steps: int = 500
    value_lr: float = 1e-2
    tau: float = 0.5
    n_generation_prompts: int = 64
    max_new_tokens: int = 24
    generation_seed: int = 0

    def __post_init__(self):
        if not self.gammas or self.gammas[0] != 0.0:
            raise ValueError(
                "gammas must start with 0.0 (plain DPO, the baseline of every comparison), got "
                f"{self.gammas}"
            )
        for g in self.gammas:
            UPODPOLoss(g, self.alpha)  # raises on a bad gamma or alpha
        for w in self.modpo_w_aux:
            MODPOLoss(w)
        if self.pref.seed in self.extra_seeds:
            raise ValueError(
                f"extra_seeds {self.extra_seeds} must differ from the preference phase's seed "
                f"{self.pref.seed}: a run with the same seed is the first run again"
            )
        if self.max_new_tokens >= self.data.max_length:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must leave room for a prompt within "
                f"max_length ({self.data.max_length}), the tiny model's number of positions"
            )

    def experiment(self) -> ExperimentConfig:
        """The pipeline's view of this config (model, data, SFT, preference phase; beta), for
        ``lm.experiment.prepare_data`` and ``lm.experiment.prepare_reference``."""
        return ExperimentConfig(
            self.name, self.model, self.data, self.sft, self.pref, losses=(), betas=(self.beta,)
        )

    def runs(self) -> list[tuple[str, UPODPOLoss | MODPOLoss, PhaseConfig]]:
        """(label, loss, preference phase) of every run, DPO first."""
        upo = [UPODPOLoss(g, self.alpha) for g in self.gammas]
        out = [
            (loss.label, loss, self.pref) for loss in upo + [MODPOLoss(w) for w in self.modpo_w_aux]
        ]
        for seed in self.extra_seeds:
            out += [
                (f"{loss.label} seed={seed}", loss, dataclasses.replace(self.pref, seed=seed))
                for loss in upo
            ]
        return out


def aux_lm_config(fast: bool = False) -> AuxLMConfig:  # long: two configs, every field named
    """The notebook's configs: a random-init GPT-2 (the ``quick`` preset's family) on the local HH
    files.

    Full (about four minutes on 2 busy CPU cores): 2 layers of 64, SFT on 1,024 targets, one pass
    over 384 training pairs, 192 held-out pairs, 64 held-out prompts; DPO, UPO-DPO at gamma 0.1 and
    MODPO at w_aux 0.5, then DPO and UPO-DPO with another order of the training pairs. Fast
    (``UPO_REF_FAST=1``, seconds): 2 layers of 32 and everything smaller. The preference phase uses
    AdamW at 1e-4: at the ``quick`` preset's RMSprop 2e-5, 24 steps move the policy so little that
    its samples barely change. Microbatches of 2 pairs keep each (tokens x 50,257) logit buffer
    under 32 MB, which glibc reuses instead of mapping fresh pages every time (a third less time on
    the CPU; no effect on the numbers beyond rounding). The same code runs a hub or local model on a
    GPU: replace ``model``.
    """
    if fast:
        return AuxLMConfig(
            name="aux-lm-fast",
            model=ModelConfig(TINY_GPT2, n_layer=2, n_head=2, n_embd=32),
            data=DataConfig(
                ("hh",),
                max_length=40,
                max_prompt_length=24,
                n_train_pairs=64,
                n_eval_pairs=32,
                n_sft_examples=128,
            ),
            sft=PhaseConfig(
                n_examples=128,
                batch_size=32,
                microbatch_size=8,
                eval_every=128,
                lr=1e-3,
                optimizer="adamw",
                warmup_steps=2,
                eval_batch_size=8,
            ),
            pref=PhaseConfig(
                n_examples=64,
                batch_size=16,
                microbatch_size=4,
                eval_every=64,
                lr=1e-4,
                optimizer="adamw",
                warmup_steps=2,
                eval_batch_size=8,
            ),
            n_generation_prompts=16,
            max_new_tokens=12,
        )
    return AuxLMConfig(
        name="aux-lm",
        model=ModelConfig(TINY_GPT2, n_layer=2, n_head=2, n_embd=64),
        data=DataConfig(
            ("hh",),
            max_length=64,
            max_prompt_length=32,
            n_train_pairs=384,
            n_eval_pairs=192,
            n_sft_examples=1024,
        ),
        sft=PhaseConfig(
            n_examples=1024,
            batch_size=32,
            microbatch_size=4,
            eval_every=1024,
            lr=1e-3,
            optimizer="adamw",
            warmup_steps=5,
            eval_batch_size=4,
        ),
        pref=PhaseConfig(
            n_examples=384,
            batch_size=16,
            microbatch_size=2,
            eval_every=384,
            lr=1e-4,
            optimizer="adamw",
            warmup_steps=5,
            eval_batch_size=4,
        ),
    )


@dataclass
class AuxExperiment:
    """Everything :func:`run_aux_experiment` measured.

    ``rewards[split]``: R(x, y_w), R(x, y_l) of that split's pairs; ``values``: the fitted V;
    ``extras``: the per-pair tensors the losses read; ``before``: pi_ref (the SFT model) evaluated
    like the policies; ``runs``: in the order of ``AuxLMConfig.runs``, DPO first.
    """

    cfg: AuxLMConfig
    data: ExperimentData
    rewards: dict[str, tuple[Tensor, Tensor]]
    values: PromptValues
    extras: dict[str, dict[str, Tensor]]
    before: AuxEvaluation
    runs: list[AuxRun]
    sft_final: dict[str, float]
    seconds: float


def _run_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in label.lower())


def _fit_values(
    cfg: AuxLMConfig, data: ExperimentData, ref: Reference, rewards, device
) -> tuple[PromptValues, dict[str, dict[str, Tensor]]]:
    """V fitted on the training pairs' prompt features, its R^2 on the eval pairs, and the extras
    (R(x, y_w), R(x, y_l), V(x) per pair) of both splits."""
    splits = {"train": data.pref_train, "eval": data.pref_eval}
    features = {
        split: prompt_features(
            ref.model, [p.prompt for p in pairs], cfg.pref.eval_batch_size, data.pad_id, device
        )  # (N, H)
        for split, pairs in splits.items()
    }
    values = fit_prompt_values(
        features["train"],
        *rewards["train"],
        cfg.value_hidden_sizes,
        cfg.tau,
        cfg.value_steps,
        cfg.value_lr,
    )
    baseline = torch.cat(rewards["train"]).double().mean().item()
    values.r2_eval = values.r_squared(features["eval"], *rewards["eval"], baseline)
    extras = {split: aux_extras(*rewards[split], values(features[split])) for split in splits}
    return values, extras


def _held_out_set(
    cfg: AuxLMConfig, data: ExperimentData, ref: Reference, rewards, reward_fn: Reward
) -> HeldOutSet:
    """The eval pairs and generation prompts every model of the experiment is evaluated on."""
    return HeldOutSet(
        pairs=data.pref_eval,
        reference=ref.reference["eval"],
        rewards=rewards,
        beta=cfg.beta,
        logps=ref.logps,
        prompts=generation_prompts(
            data.pref_eval, cfg.n_generation_prompts, cfg.data.max_length - cfg.max_new_tokens
        ),
        reward_fn=reward_fn,
        max_new_tokens=cfg.max_new_tokens,
        eos_id=data.pad_id,
        batch_size=cfg.pref.eval_batch_size,
        seed=cfg.generation_seed,
    )


def _preference_run(
    cfg, data, ref, extras, held_out, run, out_dir, identity, device, resume, progress
) -> AuxRun:
    """Train one (label, loss, preference phase) of ``cfg.runs()`` from pi_ref and evaluate it."""
    label, loss, pref = run
    policy = copy.deepcopy(ref.model)
    phase = PreferencePhase(loss, cfg.beta, ref.reference, extras=extras, **ref.logps.as_kwargs())
    run_dir = out_dir / _run_name(label)
    final = train(
        policy, phase, data.pref_train, data.pref_eval, pref, run_dir, device, resume,
        progress, desc=label,
        identity={**identity, "pref": dataclasses.asdict(pref), "loss": repr(loss)},
    )  # fmt: skip
    evaluated = evaluate_aux(policy, label, held_out, device)
    return AuxRun(label, loss, pref.seed, final, read_metrics(run_dir / METRICS), evaluated)


def run_aux_experiment(
    cfg: AuxLMConfig,
    out_dir: str | Path,
    reward_fn: Reward | None = None,
    reward_name: str = "readability",
    device: torch.device | None = None,
    resume: bool = True,
    progress: bool = False,
) -> AuxExperiment:
    """Data, SFT (pi_ref), rewards, V, then one preference run per loss of ``cfg``, each evaluated
    before (pi_ref, once) and after training.

    ``reward_fn`` defaults to readability, ``TextReward(tokenizer)``; it is required for the
    synthetic task, which has no tokenizer. ``reward_name`` names it in the checkpoints' identity.
    Checkpoints and metrics go under ``out_dir`` (``sft/``, one folder per run); with ``resume`` a
    finished run is not retrained.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    device = device if device is not None else default_device()
    exp = cfg.experiment()
    tokenizer, data = load_experiment_data(exp)
    if reward_fn is None:
        if tokenizer is None:
            raise ValueError(
                "the synthetic task has no text: pass reward_fn, a function of token ids"
            )
        reward_fn = TextReward(tokenizer)
    rewards = {
        "train": pair_rewards(reward_fn, data.pref_train),
        "eval": pair_rewards(reward_fn, data.pref_eval),
    }
    ref = prepare_reference(exp, data, out_dir, device, resume, progress)
    values, extras = _fit_values(cfg, data, ref, rewards, device)
    held_out = _held_out_set(cfg, data, ref, rewards["eval"], reward_fn)
    before = evaluate_aux(ref.model, "SFT (pi_ref, before)", held_out, device)
    identity = {
        **ref.identity,
        "beta": cfg.beta,
        "aux": {
            "reward": reward_name,
            "alpha": cfg.alpha,
            "value": [cfg.value_hidden_sizes, cfg.value_steps, cfg.value_lr, cfg.tau],
        },
    }
    runs = [
        _preference_run(
            cfg, data, ref, extras, held_out, run, out_dir, identity, device, resume, progress
        )
        for run in cfg.runs()
    ]
    seconds = time.perf_counter() - t0
    return AuxExperiment(cfg, data, rewards, values, extras, before, runs, ref.sft_final, seconds)
