r"""Per-sequence log-probabilities log pi(y | x) of a causal language model, over response tokens
only.

For a sequence (x, y) of input ids with labels equal to the ids on y and ``IGNORE_INDEX`` on x and
on padding,

.. math::

    \log\pi(y \mid x) = \sum_{t:\ \mathrm{label}_{t+1} \ne \mathrm{ignore}}
        \log \mathrm{softmax}(z_t)[\mathrm{label}_{t+1}],

where z_t are the logits at position t (they predict token t+1). ``average=True`` divides by the
number of response tokens instead (a per-token mean; it changes what beta means, so it is an
option, never a default).

Only response positions need logits. :func:`sequence_logps` therefore runs the model's body once,
gathers the hidden states at the N response positions of the whole batch, and applies the output
layer and a fused ``cross_entropy`` to those (N, V) rows only: no (B, T, V) logits tensor and no
full ``log_softmax`` is ever formed. This is exact for any model whose logits are
``lm_head(body(x))`` (GPT-2, Llama and most causal LMs); :func:`head_is_linear_readout` checks it
for a given model, and ``response_only=False`` takes the plain path through ``model(...).logits``
for the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "logps_from_logits",
    "sequence_logps",
    "concatenated_logps",
    "head_is_linear_readout",
]

IGNORE_INDEX = (
    -100
)  # label of a position that enters no log-prob (prompt, padding); torch's default


def _reduce(token_logps: Tensor, rows: Tensor, n_rows: int, average: bool) -> Tensor:
    """Sum (or average) per-token log-probs (N,) into their rows (n_rows,)."""
    out = torch.zeros(n_rows, dtype=token_logps.dtype, device=token_logps.device)
    out = out.index_add(0, rows, token_logps)  # (B,)
    if average:
        counts = torch.bincount(rows, minlength=n_rows).to(out.dtype)  # (B,)
        if bool((counts == 0).any()):
            raise ValueError(
                "average=True on a sequence with no response tokens: its mean log-prob is undefined"
            )
        out = out / counts
    return out


def logps_from_logits(logits: Tensor, labels: Tensor, average: bool = False) -> Tensor:
    """log pi(y|x) per row from full logits (B, T, V) and labels (B, T) -> (B,). The plain path."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)"
        )
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX  # (B, T-1)
    rows = mask.nonzero()[:, 0]  # (N,) the row of each response token
    z = logits[:, :-1][mask].float()  # (N, V)
    token_logps = -F.cross_entropy(z, targets[mask], reduction="none")  # (N,)
    return _reduce(token_logps, rows, labels.shape[0], average)


def sequence_logps(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    average: bool = False,
    response_only: bool = True,
    inputs_embeds: Tensor | None = None,
) -> Tensor:
    """log pi(y|x) of each row of a right-padded batch: ids, mask, labels (B, T) -> (B,), float32.

    ``response_only=True`` applies the output layer to the response positions only (see the module
    docstring); ``False`` computes full logits. Both give the same numbers up to float rounding.
    ``inputs_embeds`` (B, T, C): the model's input vectors in place of the ids' embeddings (the
    cached trunk states of a partially fine-tuned model, ``upo_ref.lm.partial``).
    """
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    if not response_only:
        logits = model(**inputs, attention_mask=attention_mask).logits  # (B, T, V)
        return logps_from_logits(logits, labels, average)
    hidden = model.base_model(
        **inputs, attention_mask=attention_mask
    ).last_hidden_state  # (B, T, C)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    rows = mask.nonzero()[:, 0]  # (N,)
    z = model.get_output_embeddings()(hidden[:, :-1][mask]).float()  # (N, V)
    token_logps = -F.cross_entropy(z, targets[mask], reduction="none")  # (N,)
    return _reduce(token_logps, rows, labels.shape[0], average)


def concatenated_logps(
    model, batch: dict[str, Tensor], average: bool = False, response_only: bool = True
) -> tuple[Tensor, Tensor]:
    """(log pi(y_w|x), log pi(y_l|x)), each (B,), from one forward pass over a ``collate_pairs``
    batch of 2B rows (chosen first, rejected second); its ``inputs_embeds``, if it has them, are
    used."""
    logps = sequence_logps(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        average,
        response_only,
        batch.get("inputs_embeds"),
    )  # (2B,)
    B = logps.shape[0] // 2
    return logps[:B], logps[B:]


@torch.no_grad()
def head_is_linear_readout(model, vocab_size: int, atol: float = 1e-4) -> bool:
    """True if ``model(x).logits == get_output_embeddings()(base_model(x).last_hidden_state)`` on a
    small random input, i.e. the response-only path of :func:`sequence_logps` is exact for it."""
    head = model.get_output_embeddings()
    if head is None or getattr(model, "base_model", model) is model:
        return False
    device = next(model.parameters()).device
    x = torch.randint(0, vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        full = model(input_ids=x).logits.float()
        ours = head(model.base_model(input_ids=x).last_hidden_state).float()
    finally:
        model.train(was_training)
    return full.shape == ours.shape and bool(torch.allclose(full, ours, atol=atol, rtol=0))
