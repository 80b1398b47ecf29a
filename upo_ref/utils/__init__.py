"""Helpers every layer may use: standard errors (``stats``), where data and figures are (``paths``),
figure styling for the notebooks (``plots``)."""
