"""upo_ref inside the tools people already train with.

``trl``: :class:`~upo_ref.integrations.trl.UPOTrainer`, TRL's ``DPOTrainer`` training with any
``upo_ref.losses`` loss. ``synthetic_text``: the synthetic task of ``upo_ref.lm.synthetic`` as a
text dataset in TRL's format, with a word-level tokenizer whose ids are the task's own.

Nothing here is imported by the rest of upo_ref: TRL and ``datasets`` are needed only when one of
these modules is imported (``pip install -r requirements.txt`` installs them).
"""
