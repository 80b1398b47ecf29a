"""Log-probs: only response tokens count (checked against a token-by-token loop), padding changes
nothing, one concatenated pass equals two passes, and the response-only path equals full logits."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from upo_ref.lm.logprobs import (
    IGNORE_INDEX,
    concatenated_logps,
    head_is_linear_readout,
    logps_from_logits,
    sequence_logps,
)
from upo_ref.lm.tokenize import TokenizedPair, collate_pairs, collate_sequences

# Summed log-probs of ~10 tokens under a random model are about -40; float32 rounding of a sum of
# that size, computed along two different paths (different matmul shapes), stays well below this.
LOGP_ATOL = 1e-4

V = 50  # a small vocabulary keeps the loop fast; pad id 0 is also an ordinary token


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=32))
    return m.eval()


def random_pairs(n: int, seed: int) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return tuple(
            torch.randint(
                0, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g
            ).tolist()
        )

    return [TokenizedPair(ids(1, 8), ids(1, 9), ids(1, 9)) for _ in range(n)]


@torch.no_grad()
def loop_logp(model, prompt, response) -> float:
    """The obviously-correct reference: for each response token, run the model on everything before
    it (no padding, no mask) and add the log-softmax of that token."""
    seq = list(prompt) + list(response)
    total = 0.0
    for t in range(len(prompt), len(seq)):
        logits = model(torch.tensor([seq[:t]])).logits[0, -1]  # (V,)
        total += float(torch.log_softmax(logits.double(), -1)[seq[t]])
    return total


@pytest.mark.parametrize("response_only", [True, False])
def test_padded_batch_matches_token_by_token_loop(model, response_only):
    pairs = random_pairs(6, seed=1)
    seqs = [(p.prompt, p.chosen) for p in pairs]
    batch = collate_sequences(seqs, pad_id=7)
    with torch.no_grad():
        got = sequence_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            response_only=response_only,
        )
    want = torch.tensor([loop_logp(model, x, y) for x, y in seqs], dtype=torch.float64)
    assert got.shape == (6,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=LOGP_ATOL, rtol=0)


def test_prompt_and_padding_tokens_contribute_nothing(model):
    """Changing the prompt's *labels* cannot matter (they are masked), and neither can the padding:
    its id, its amount, or whether it is attended to."""
    x, y = (3, 4, 5, 6), (7, 8, 9)
    base = collate_sequences([(x, y), ((1,), (2, 3, 4, 5, 6, 7, 8, 9))], pad_id=0)
    with torch.no_grad():
        ref = sequence_logps(model, base["input_ids"], base["attention_mask"], base["labels"])[0]
        for pad_id, extra in ((0, 0), (11, 0), (0, 5), (42, 9)):
            b = collate_sequences([(x, y), ((1,), (2, 3, 4, 5, 6, 7, 8, 9))], pad_id=pad_id)
            ids = torch.cat([b["input_ids"], torch.full((2, extra), pad_id)], 1)
            mask = torch.cat([b["attention_mask"], torch.zeros(2, extra, dtype=torch.long)], 1)
            labels = torch.cat([b["labels"], torch.full((2, extra), IGNORE_INDEX)], 1)
            torch.testing.assert_close(
                sequence_logps(model, ids, mask, labels)[0], ref, atol=LOGP_ATOL, rtol=0
            )
    # Only the response's own labels count: labels (B, T) with the prompt unmasked give another sum.
    leaky = base["labels"].clone()
    leaky[0, 1:4] = base["input_ids"][0, 1:4]
    with torch.no_grad():
        assert (
            abs(
                float(
                    sequence_logps(model, base["input_ids"], base["attention_mask"], leaky)[0] - ref
                )
            )
            > 1.0
        )


def test_concatenated_pass_equals_two_passes(model):
    pairs = random_pairs(5, seed=2)
    with torch.no_grad():
        pc, pr = concatenated_logps(model, collate_pairs(pairs, range(5), pad_id=0))
        for which, got in (("chosen", pc), ("rejected", pr)):
            b = collate_sequences([(p.prompt, getattr(p, which)) for p in pairs], pad_id=0)
            want = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
            torch.testing.assert_close(got, want, atol=LOGP_ATOL, rtol=0)
    assert pc.shape == pr.shape == (5,)


def test_average_is_sum_over_response_token_count(model):
    pairs = random_pairs(4, seed=3)
    b = collate_sequences([(p.prompt, p.chosen) for p in pairs], pad_id=0)
    with torch.no_grad():
        total = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        mean = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"], average=True)
    counts = torch.tensor([len(p.chosen) for p in pairs], dtype=torch.float32)
    torch.testing.assert_close(mean, total / counts, atol=1e-6, rtol=0)
    empty = torch.full_like(b["labels"], IGNORE_INDEX)
    with pytest.raises(ValueError, match="no response tokens"):
        logps_from_logits(torch.zeros(*b["labels"].shape, V), empty, average=True)


def test_gradients_reach_only_through_response_positions(model):
    """d log pi(y|x) / d logits is zero at every position whose next token is not a response
    token."""
    b = collate_sequences([((1, 2, 3), (4, 5)), ((6,), (7, 8, 9, 10))], pad_id=0)
    logits = torch.randn(2, b["input_ids"].shape[1], V, requires_grad=True)
    logps_from_logits(logits, b["labels"]).sum().backward()
    used = logits.grad.abs().sum(-1) > 0  # (B, T)
    want = torch.zeros_like(used)
    want[:, :-1] = b["labels"][:, 1:] != IGNORE_INDEX
    assert torch.equal(used, want)


def test_head_is_linear_readout(model):
    assert head_is_linear_readout(model, V)

    class ScaledLogits(GPT2LMHeadModel):  # e.g. a model with logit soft-capping or scaling
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    scaled = ScaledLogits(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=V, n_positions=16))
    assert not head_is_linear_readout(scaled, V)
    assert scaled.training  # the check leaves the mode as it found it
