"""The frozen trunk's hidden states, computed once per sequence and cached on disk.

For partial fine-tuning (:mod:`upo_ref.lm.partial`) the output h of the frozen bottom layers is a
fixed function of a sequence's token ids. :func:`cached_pairs` computes it for the chosen and the
rejected sequence of every pair (batched, in order of length so that little is padding) and stores
it under a key made of

* the trunk's fingerprint: SHA-256 of its config and of every weight (:func:`model_fingerprint`),
* the data's fingerprint: SHA-256 of every pair's token ids, after truncation (so the data files,
  the split, the subsampling, the tokenizer and ``max_length`` all enter),
* the storage dtype and the precision the trunk ran in,
* how the pass was computed (:func:`compute_identity`): the torch version, the device (for a CPU
  its kernel set and torch's thread count; for a GPU its name) and the batch size. A bf16 pass
  rounds differently with the thread count and with the batches' shapes, so without these a cache
  filled one way and reused another would give other numbers than a fresh computation.

A second run, and every evaluation, load the file instead; a change to any of these gives another
key and a fresh computation: a cache hit returns exactly what the pass would compute again. (Two
CPUs of one kernel set, one with AMX and one without, are not told apart: a cache belongs to the
machine that filled it.) Storage is float16 by default (SmolLM2's largest hidden value is about
2.5e4, below float16's 65504; a value that does not fit raises an error rather than becoming inf)
and is upcast to float32 for compute. The pairs come back as :class:`CachedPair`, token ids plus
the two (T_i, C) state tensors, which :class:`CachedPreferencePhase` collates into
``inputs_embeds`` for the top of the model. SFT examples (x, y) need the states of x + y only:
:func:`cached_targets` stores those under a key of their own, and :class:`CachedSFTPhase` trains
the top on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..utils.cpu import slow_bf16_warning
from .config import CACHE_DTYPE_NAMES
from .partial import split_model
from .phases import PreferencePhase, SFTPhase, autocast
from .tokenize import TokenizedPair, collate_pairs, collate_sequences

__all__ = [
    "CACHE_DTYPES",
    "CachedPair",
    "model_fingerprint",
    "data_fingerprint",
    "compute_identity",
    "trunk_states",
    "pair_sequences",
    "with_states",
    "cached_pairs",
    "cached_targets",
    "collate_cached",
    "collate_cached_targets",
    "CachedPreferencePhase",
    "CachedSFTPhase",
    "cache_trunk",
]

CACHE_DTYPES = {name: getattr(torch, name) for name in CACHE_DTYPE_NAMES}


@dataclass(frozen=True, eq=False)
class CachedPair(TokenizedPair):
    """A tokenized pair with the trunk's states of (x, y_w) and (x, y_l), each (T, C)."""

    hidden_chosen: Tensor | None = None
    hidden_rejected: Tensor | None = None


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's config and of every tensor of its state dict (name, dtype, shape,
    bytes)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update((config.to_json_string() if config is not None else type(model).__name__).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """SHA-256 of the token ids of every pair, in order."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    return h.hexdigest()


def compute_identity(device: torch.device, batch_size: int) -> dict:
    """What, besides the weights, the data, the dtype and the precision, a trunk pass's states
    depend on: the torch version, the batch size and the device (a CPU's kernel set,
    ``torch.backends.cpu.get_cpu_capability()``, and ``torch.get_num_threads()`` at the time of
    the call; a GPU's name)."""
    if device.type == "cpu":
        where = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    elif device.type == "cuda":
        where = {"cuda": torch.cuda.get_device_name(device)}
    else:
        where = {device.type: str(device)}
    return {"torch": torch.__version__, "batch_size": batch_size, **where}


@torch.no_grad()
def trunk_states(
    trunk,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    dtype: torch.dtype = torch.float16,
) -> list[Tensor]:
    """The trunk's output h (T_i, C) of every sequence, stored in ``dtype`` on the CPU.

    Sequences are batched in order of length (right-padded; a causal model's states at real
    positions do not depend on the padding after them). A state that does not fit ``dtype``
    raises a ValueError naming a wider one. A bf16 pass on a CPU without bf16 matmul kernels
    (``utils.cpu``) is warned of on stderr first: it can take hours.
    """
    warning = slow_bf16_warning(
        precision, device, f"the trunk's pass over {len(sequences)} sequences"
    )
    if warning:
        print(
            f"{warning}. A trunk_precision of float32 (python -m upo_ref.reproduce "
            "--trunk-precision float32) computes it in float32 instead: its own cache and run "
            "folder, other numbers than the committed results.",
            file=sys.stderr,
        )
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[Tensor | None] = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)  # (b, T)
        mask = torch.zeros((len(idx), T), dtype=torch.long)  # (b, T)
        for r, i in enumerate(idx):
            ids[r, : len(sequences[i])] = torch.tensor(list(sequences[i]))
            mask[r, : len(sequences[i])] = 1
        with autocast(device, precision):
            h = trunk(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        h = h.float().cpu()  # (b, T, C)
        stored = h.to(dtype)
        if not bool(torch.isfinite(stored).all()):
            raise ValueError(
                f"a trunk state (largest |h| = {float(h.abs().max()):.4g}) does not fit {dtype}: "
                f"store the cache as bfloat16 or float32 (cache_dtype)"
            )
        for r, i in enumerate(idx):
            out[i] = stored[r, : len(sequences[i])].clone()
    return out


def _load_or_compute(
    trunk, sequences, key: dict, cache_dir, pad_id, batch_size, device, precision, cache_dtype
) -> list[Tensor]:
    """The trunk's states of ``sequences`` from ``cache_dir/<hash of key>.pt``, or computed
    (:func:`trunk_states`) and stored there."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{name}.pt"
    if path.exists():
        stored = torch.load(path, weights_only=True)
        if stored["key"] != json.dumps(key, sort_keys=True):
            raise ValueError(f"{path} holds another cache (a key collision): delete it")
        return stored["states"]
    states = trunk_states(
        trunk, sequences, pad_id, batch_size, device, precision, CACHE_DTYPES[cache_dtype]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": json.dumps(key, sort_keys=True), "states": states}, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves no half-written cache behind
    return states


def _key(
    trunk, examples, cache_dtype: str, precision: str, trunk_id: str | None, device, batch_size
) -> dict:
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {cache_dtype!r}")
    return {
        "trunk": trunk_id or model_fingerprint(trunk),
        "data": data_fingerprint(examples),
        "dtype": cache_dtype,
        "precision": precision,
        "compute": compute_identity(device, batch_size),
    }


def pair_sequences(pairs: Sequence[TokenizedPair]) -> list[tuple[int, ...]]:
    """The 2N sequences whose trunk states a pair needs: every x + y_w, then every x + y_l."""
    return [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]


def with_states(pairs: Sequence[TokenizedPair], states: Sequence[Tensor]) -> list[CachedPair]:
    """``pairs`` with the states of their :func:`pair_sequences`, in that order."""
    n = len(pairs)
    return [
        CachedPair(p.prompt, p.chosen, p.rejected, states[i], states[n + i])
        for i, p in enumerate(pairs)
    ]


def cached_pairs(
    trunk,
    pairs: Sequence[TokenizedPair],
    cache_dir: str | Path,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    cache_dtype: str = "float16",
    trunk_id: str | None = None,
) -> list[CachedPair]:
    """``pairs`` with the trunk's states, from ``cache_dir/<key>.pt`` or computed and stored there.

    ``trunk_id``: the trunk's :func:`model_fingerprint` when the caller has it already.
    """
    key = _key(trunk, pairs, cache_dtype, precision, trunk_id, device, batch_size)
    sequences = pair_sequences(pairs)
    states = _load_or_compute(
        trunk, sequences, key, cache_dir, pad_id, batch_size, device, precision, cache_dtype
    )
    return with_states(pairs, states)


def cached_targets(
    trunk,
    examples: Sequence[TokenizedPair],
    cache_dir: str | Path,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    cache_dtype: str = "float16",
    trunk_id: str | None = None,
) -> list[CachedPair]:
    """SFT examples (x, y) (``tokenize.tokenize_sft``: chosen = the target) with the trunk's
    states of x + y only, under a key of their own (``"sequences": "targets"``); their
    ``hidden_rejected`` is None, since SFT reads only (prompt, chosen)."""
    key = _key(trunk, examples, cache_dtype, precision, trunk_id, device, batch_size)
    key["sequences"] = "targets"
    sequences = [p.prompt + p.chosen for p in examples]
    states = _load_or_compute(
        trunk, sequences, key, cache_dir, pad_id, batch_size, device, precision, cache_dtype
    )
    return [
        CachedPair(p.prompt, p.chosen, p.rejected, h, None)
        for p, h in zip(examples, states, strict=True)
    ]


def collate_cached(
    pairs: Sequence[CachedPair], indices: Sequence[int], pad_id: int
) -> dict[str, Tensor]:
    """``collate_pairs`` plus ``inputs_embeds`` (2B, T, C) float32: the trunk states, zero on
    padding."""
    batch = collate_pairs(pairs, indices, pad_id)
    states = [getattr(p, "hidden_chosen", None) for p in pairs]
    states += [getattr(p, "hidden_rejected", None) for p in pairs]
    if any(s is None for s in states):
        raise ValueError("collate_cached needs pairs with trunk states (from cached_pairs)")
    batch["inputs_embeds"] = _embeds(states, *batch["input_ids"].shape)  # (2B, T, C)
    return batch


def _embeds(states: Sequence[Tensor], rows: int, T: int) -> Tensor:
    """The states (T_i, C) as one float32 (rows, T, C) batch, zero on padding."""
    embeds = torch.zeros(rows, T, states[0].shape[-1])  # (rows, T, C)
    for r, s in enumerate(states):
        embeds[r, : s.shape[0]] = s.float()
    return embeds


def collate_cached_targets(
    examples: Sequence[CachedPair], indices: Sequence[int], pad_id: int
) -> dict[str, Tensor]:
    """``SFTPhase.collate`` plus ``inputs_embeds`` (B, T, C) float32: the trunk states of x + y,
    zero on padding."""
    states = [getattr(e, "hidden_chosen", None) for e in examples]
    if any(s is None for s in states):
        raise ValueError("collate_cached_targets needs examples with trunk states (cached_targets)")
    batch = collate_sequences([(e.prompt, e.chosen) for e in examples], pad_id)  # (B, T) each
    batch["index"] = torch.tensor(list(indices), dtype=torch.long)  # (B,)
    batch["inputs_embeds"] = _embeds(states, *batch["input_ids"].shape)  # (B, T, C)
    return batch


@dataclass
class CachedPreferencePhase(PreferencePhase):
    """:class:`PreferencePhase` for the top of a partially fine-tuned model: batches carry the
    cached trunk states as ``inputs_embeds``, which the log-probs are computed from."""

    def collate(self, pairs: Sequence[CachedPair], indices: Sequence[int]) -> dict[str, Tensor]:
        return collate_cached(pairs, indices, self.pad_id)


@dataclass
class CachedSFTPhase(SFTPhase):
    """:class:`SFTPhase` for the top of a partially fine-tuned model: batches carry the cached
    trunk states of x + y (:func:`cached_targets`) as ``inputs_embeds``."""

    def collate(self, examples: Sequence[CachedPair], indices: Sequence[int]) -> dict[str, Tensor]:
        return collate_cached_targets(examples, indices, self.pad_id)


def cache_trunk(
    model, k: int, splits: dict, cache_dir, pad_id, batch_size, device, targets=None, **options
) -> tuple[torch.nn.Module, dict[str, list[CachedPair]]]:
    """Split ``model`` at its top ``k`` layers (``partial.split_model``) and attach the trunk's
    cached states to the pairs of every split (name -> TokenizedPairs) and to the SFT examples of
    every split of ``targets`` (name -> SFT examples, :func:`cached_targets`); returns (the top of
    the model, the cached splits, both kinds under their names). The other arguments, and
    ``options`` (``precision``, ``cache_dtype``), are those of :func:`cached_pairs`. The trunk is
    dropped afterwards: nothing but the cache needs it."""
    targets = targets or {}
    if set(splits) & set(targets):
        raise ValueError(f"splits and targets share the names {sorted(set(splits) & set(targets))}")
    trunk, top = split_model(model, k)
    trunk.to(device)
    args = dict(pad_id=pad_id, batch_size=batch_size, device=device, **options)
    args["trunk_id"] = model_fingerprint(trunk)
    cached = {name: cached_pairs(trunk, pairs, cache_dir, **args) for name, pairs in splits.items()}
    cached.update(
        {name: cached_targets(trunk, ex, cache_dir, **args) for name, ex in targets.items()}
    )
    return top, cached
