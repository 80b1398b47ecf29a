r"""Token-id data as text, for trainers that take text (TRL): the synthetic task, or any ids.

Every token id gets a word, and :func:`word_tokenizer` is a word-level tokenizer on exactly those
words, splitting on whitespace, so that a pair written out by :func:`pairs_dataset` and tokenized
again has the same ids, token for token: a TRL run and an upo_ref run see the same sequences. For
the synthetic task of :mod:`upo_ref.lm.synthetic` (:func:`synthetic_tokenizer`,
:func:`synthetic_dataset`) content token i is ``"c{i}"``, topic token k is ``"t{k}"`` and EOS is
``"<eos>"``. No file and no hub access is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..lm.synthetic import SyntheticTask
from ..lm.tokenize import TokenizedPair

__all__ = [
    "EOS_WORD",
    "word_tokenizer",
    "pairs_dataset",
    "token_words",
    "synthetic_tokenizer",
    "synthetic_dataset",
]

EOS_WORD = "<eos>"


def token_words(task: SyntheticTask) -> list[str]:
    """The word of every token id of ``task``, indexed by id."""
    return (
        [f"c{i}" for i in range(task.n_content)]
        + [f"t{k}" for k in range(task.n_topics)]
        + [EOS_WORD]
    )


def word_tokenizer(words: Sequence[str]):
    """A ``PreTrainedTokenizerFast`` mapping ``words[i]`` to id i; the last word is EOS and also the
    padding token (as in the upo_ref pipeline). The vocabulary has no UNK: a word not in it makes
    the tokenizer raise ("Missing [UNK] token"), it is never mapped to another id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=words[-1], pad_token=words[-1])


def pairs_dataset(words: Sequence[str], pairs: Sequence[TokenizedPair]):
    """A ``datasets.Dataset`` in TRL's standard explicit-prompt preference format, one row per pair,
    in the order of ``pairs``; responses start with a space and keep their EOS word (TRL appends
    EOS only to a response that does not end with it)."""
    from datasets import Dataset

    def text(ids: Sequence[int]) -> str:
        return " ".join(words[i] for i in ids)

    return Dataset.from_dict(
        {
            "prompt": [text(p.prompt) for p in pairs],
            "chosen": [" " + text(p.chosen) for p in pairs],
            "rejected": [" " + text(p.rejected) for p in pairs],
        }
    )


def synthetic_tokenizer(task: SyntheticTask):
    """:func:`word_tokenizer` on the words of the task's ids."""
    return word_tokenizer(token_words(task))


def synthetic_dataset(task: SyntheticTask, pairs: Sequence[TokenizedPair]):
    """:func:`pairs_dataset` of pairs of the synthetic task."""
    return pairs_dataset(token_words(task), pairs)
