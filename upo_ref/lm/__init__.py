"""The language-model pipeline: preference data, per-sequence log-probs, models, typed configs and
presets, the SFT/preference trainer, and the experiment driver that ties them together."""
