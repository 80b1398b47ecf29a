"""Where upo_ref finds shared data and writes figures. Nothing here touches the disk on import.

``../shared`` (beside the repository) holds the HH-RLHF files and the GPT-2 tokenizer on the
project's machines; set ``UPO_REF_SHARED`` to point elsewhere. Nothing from it is ever copied
into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def shared_dir() -> Path:
    """``$UPO_REF_SHARED``, else ``<repo>/../shared``."""
    return Path(os.environ.get("UPO_REF_SHARED", REPO_ROOT.parent / "shared"))


def hh_dir() -> Path:
    """Local Anthropic HH-RLHF files: ``<shared>/data/hh-rlhf``."""
    return shared_dir() / "data" / "hh-rlhf"


def gpt2_tokenizer_dir() -> Path:
    """Local GPT-2 tokenizer files: ``<shared>/models/gpt2-tokenizer``."""
    return shared_dir() / "models" / "gpt2-tokenizer"


def figures_dir() -> Path:
    """``$UPO_REF_FIGURES`` (the notebook tests point it at a temporary folder), else
    ``<repo>/figures``."""
    return Path(os.environ.get("UPO_REF_FIGURES", REPO_ROOT / "figures"))


def fast_mode() -> bool:
    """True when ``UPO_REF_FAST=1``: notebooks and experiments shrink seeds/steps so CI can run
    them."""
    return os.environ.get("UPO_REF_FAST", "0") == "1"
