r"""Partial fine-tuning: the bottom of a pretrained causal LM frozen, its top k layers trained.

A Llama-family model (``model.model`` holding ``embed_tokens``, ``layers``, ``norm``; the output
layer ``lm_head``) computes

.. math:: \mathrm{logits} = \mathrm{head}(\mathrm{norm}(L_{n-1} \circ \dots \circ L_{n-k}(h))),
   \qquad h = L_{n-k-1} \circ \dots \circ L_0(\mathrm{embed}(x)).

With the bottom n - k layers frozen, the *trunk* output h of a sequence never changes, so it is
computed once per sequence and cached (:mod:`upo_ref.lm.trunk_cache`); training and every
evaluation run only the top k layers, the final norm and the head, from h. The output layer stays
frozen: SmolLM2 ties it to the input embedding, which the cached trunk has already used.

:func:`split_model` cuts a loaded model in two: the trunk (a view of the bottom layers with the
final norm replaced by the identity, so its ``last_hidden_state`` is h) and the top (the causal LM
itself, its layer list cut to the top k). The top is called with ``inputs_embeds=h`` (the
position ids are 0..T-1 either way, so the rotary embeddings agree), which is exactly the
full model's computation: ``tests/test_partial.py`` checks the log-probs against the whole model.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["split_model", "trainable_parameters"]


def _body(model):
    body = getattr(model, "model", None)
    if body is None or not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm")):
        raise ValueError(
            f"partial fine-tuning needs a Llama-family causal LM (model.model with embed_tokens, "
            f"layers, norm), got {type(model).__name__}; set train_layers=None to train all of it"
        )
    return body


def split_model(model, k: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(trunk, top) of ``model`` with its top ``k`` layers trainable. ``model`` itself becomes the
    top (its layer list is cut); the two share their weights, nothing is copied.

    ``trunk(input_ids=..., attention_mask=...).last_hidden_state`` is the output h of layer n-k-1
    (B, T, C); ``top`` is the causal LM computing the logits from ``inputs_embeds=h``. Every
    parameter is frozen except those of the top k layers and the final norm.
    """
    body = _body(model)
    n = len(body.layers)
    if not 1 <= k < n:
        raise ValueError(f"train_layers must be in 1..{n - 1} for a model of {n} layers, got {k}")
    for p in model.parameters():  # all of them, before the layer list is cut
        p.requires_grad_(False)
    # A shallow copy with its own module table: the trunk owns the bottom layers, no final norm.
    trunk = copy.copy(body)
    trunk._modules = {
        **body._modules,
        "layers": torch.nn.ModuleList(body.layers[: n - k]),
        "norm": torch.nn.Identity(),
    }
    body.layers = torch.nn.ModuleList(body.layers[n - k :])
    for p in list(body.layers.parameters()) + list(body.norm.parameters()):
        p.requires_grad_(True)
    return trunk.eval(), model


def trainable_parameters(model) -> int:
    """The number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
