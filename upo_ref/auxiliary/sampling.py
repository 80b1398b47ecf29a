r"""Sampling responses from a causal language model, one per prompt, batched and seeded."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..lm.phases import autocast
from ..lm.tokenize import TokenizedPair

__all__ = ["sample_responses", "generation_prompts"]


@torch.no_grad()
def sample_responses(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 32,
    greedy: bool = False,
) -> list[tuple[int, ...]]:
    """One response per prompt, token by token from the model: y_t ~ pi(. | x, y_<t) at temperature
    1 (``greedy=True``: the most likely token), until EOS (kept, as in the training data) or
    ``max_new_tokens``.

    Prompts are left-padded in batches, with position ids counted from each prompt's first real
    token and a key/value cache, so a prompt's response does not depend on its batch (greedy; the
    test checks it against ``model.generate``). Sampling draws from a CPU generator seeded by
    ``seed``: the same draws on any device, for given ``seed`` and ``batch_size``. Eval mode; bf16
    autocast on CUDA (the sampling itself in float32).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}"
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample_responses needs a non-empty list of non-empty prompts")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[tuple[int, ...]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            out += _sample_batch(
                model, chunk, max_new_tokens, eos_id, pad_id, device, generator, greedy
            )
    finally:
        model.train(was_training)
    return out


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask of left-padded prompts, (B, T) each."""
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(list(p))
        mask[i, T - len(p) :] = 1
    return ids, mask


def _sample_batch(
    model, prompts, max_new_tokens, eos_id, pad_id, device, generator, greedy
) -> list[tuple[int, ...]]:
    """One response per prompt of one batch, each cut after its first EOS."""
    ids, mask = (t.to(device) for t in _left_padded(prompts, pad_id))  # (B, T) each
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at each prompt's first token
    B, past = len(prompts), None
    done = torch.zeros(B, dtype=torch.bool)  # (B,)
    tokens = []
    for _ in range(max_new_tokens):
        with autocast(device):
            o = model(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=past, use_cache=True, logits_to_keep=1,
            )  # fmt: skip
        past, logits = o.past_key_values, o.logits[:, -1].float().cpu()  # logits (B, V)
        if greedy:
            nxt = logits.argmax(-1)  # (B,)
        else:
            nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)  # (B,)
        tokens.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        ids = nxt.unsqueeze(-1).to(device)  # (B, 1)
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1  # (B, 1)
    rows = torch.stack(tokens, dim=1).tolist()  # (B, t)
    return [tuple(r[: r.index(eos_id) + 1] if eos_id in r else r) for r in rows]


def generation_prompts(
    pairs: Sequence[TokenizedPair], n: int, max_prompt_tokens: int
) -> list[tuple[int, ...]]:
    """The prompts of the first n pairs, each cut to its last ``max_prompt_tokens`` tokens (the turn
    being answered, as HH truncation keeps it). A prompt shared by several pairs appears once per
    pair, as prompts do in the held-out data; each gets its own sample."""
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if not 1 <= n <= len(pairs):
        raise ValueError(
            f"asked for {n} generation prompts from {len(pairs)} pairs; need 1 <= n <= {len(pairs)}"
        )
    return [tuple(p.prompt[-max_prompt_tokens:]) for p in pairs[:n]]
