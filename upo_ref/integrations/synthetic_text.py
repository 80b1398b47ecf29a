r"""The synthetic task of :mod:`upo_ref.lm.synthetic` as text, for trainers that take text (TRL).

Every token id of the task gets a word: content token i is ``"c{i}"``, topic token k is
``"t{k}"``, EOS is ``"<eos>"``. :func:`synthetic_tokenizer` is a word-level tokenizer on exactly
those words, splitting on whitespace, so that a pair written out by :func:`synthetic_dataset` and
tokenized again has the task's ids, token for token: a TRL run and an upo_ref run see the same
sequences. No file and no hub access is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..lm.data import TokenizedPair
from ..lm.synthetic import SyntheticTask

__all__ = ["EOS_WORD", "token_words", "synthetic_tokenizer", "pair_texts", "synthetic_dataset"]

EOS_WORD = "<eos>"


def token_words(task: SyntheticTask) -> list[str]:
    """The word of every token id of ``task``, indexed by id."""
    return (
        [f"c{i}" for i in range(task.n_content)]
        + [f"t{k}" for k in range(task.n_topics)]
        + [EOS_WORD]
    )


def synthetic_tokenizer(task: SyntheticTask):
    """A ``PreTrainedTokenizerFast`` mapping the words of :func:`token_words` to their ids; EOS is
    also the padding token (as in the upo_ref pipeline). The vocabulary has no UNK: a word not in it
    makes the tokenizer raise ("Missing [UNK] token"), it is never mapped to another id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = token_words(task)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_WORD, pad_token=EOS_WORD)


def pair_texts(task: SyntheticTask, pair: TokenizedPair) -> dict[str, str]:
    """``{"prompt", "chosen", "rejected"}`` of one pair as text; responses start with a space and
    keep their EOS word (TRL appends EOS only to a response that does not end with it)."""
    words = token_words(task)

    def text(ids: Sequence[int]) -> str:
        return " ".join(words[i] for i in ids)

    return {
        "prompt": text(pair.prompt),
        "chosen": " " + text(pair.chosen),
        "rejected": " " + text(pair.rejected),
    }


def synthetic_dataset(task: SyntheticTask, pairs: Sequence[TokenizedPair]):
    """A ``datasets.Dataset`` in TRL's standard explicit-prompt preference format, one row per pair,
    in the order of ``pairs``."""
    from datasets import Dataset

    rows = [pair_texts(task, p) for p in pairs]
    return Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")})
