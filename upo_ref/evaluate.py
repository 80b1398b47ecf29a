r"""Score the final policy of a finished run on any HH-format preference files.

``python -m upo_ref.evaluate RUN_DIR [--hh-dir DIR] [--subsets a,b] [--split test] [--part all]
[--precision P] [--against P]``

RUN_DIR is one preference run of the main job (e.g. ``runs/smol/ipo_beta0.1``). Its checkpoint
stores what the run was made with (model, data and phase config, loss, beta, and for a partially
fine-tuned model the SHA-256 of the starting weights); from that the command rebuilds the starting
policy pi_ref (the model as built, or the run's SFT model), tokenizes the pairs of
``<hh-dir>/<subset>/<split>.jsonl.gz`` with the run's truncation, and prints the number of pairs
scored, the implicit-reward accuracy P(h > 0) with its binomial standard error, and the mean
margin beta * h, where h is the log-ratio difference of eq. (10) (``metrics.preference_metrics``,
what the trainer logs). ``--part eval``/``train`` keeps one side of the prompt-hash split.
``--precision`` scores in another precision than the run's; ``--against P`` scores a second time in
precision P and prints how the two agree pair by pair (the sign of each margin, the spread of their
difference): how much a bf16 forward pass (``bfloat16`` autocast, or ``bfloat16-matmul``) changes
the verdict on each pair.

It refuses a run it cannot reproduce: an unfinished run, a checkpoint without the identity, a
model file whose weights differ from those the run started from, a compact-vocabulary model (its
vocabulary was built from the training data). The trunk states of a partially fine-tuned model are
cached beside the run (``<run>/../trunk_cache``), so a second scoring of the same files is fast.
That cache is keyed by the pairs in the order scored here (the files' order), not the run's, so
the trunk runs again with other batches, and a bf16 trunk rounds a little differently with the
batch: the run's own eval pairs, rescored, give its final accuracy to within a few pairs, not bit
for bit (README, "The pretrained grid", measures it).
"""

from __future__ import annotations

import argparse
import copy
import functools
from pathlib import Path

import torch

from .lm.command import command
from .lm.config import HH_LOCAL_SUBSETS, DataConfig, ModelConfig, PhaseConfig
from .lm.data import load_hh
from .lm.experiment import TRUNCATION
from .lm.logprobs import head_is_linear_readout
from .lm.models import build_model, load_tokenizer
from .lm.phases import PRECISIONS
from .lm.split import split_by_prompt_hash
from .lm.tokenize import tokenize_pairs
from .lm.train import CHECKPOINT, PreferencePhase, evaluate, reference_logps
from .lm.trunk_cache import CachedPreferencePhase, cache_trunk, collate_cached, model_fingerprint
from .losses import PreferenceLoss
from .utils.paths import hh_dir
from .utils.stats import binomial_se, paired_difference

__all__ = ["score_run", "score_run_in", "compare_margins", "longer_response_rule", "main"]

PARTS = ("all", "train", "eval")


def _config(cls, fields: dict):
    """A frozen config from its ``asdict`` form (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _identity(run_dir: Path) -> tuple[dict, dict]:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: RUN_DIR must be one run of the main job")
    state = torch.load(path, map_location="cpu", weights_only=False)
    identity = state.get("identity", {})
    missing = [k for k in ("model", "data", "cfg", "loss", "beta", "sft") if k not in identity]
    if missing:
        raise ValueError(f"{path} does not record {missing}: cannot rebuild the run's policy")
    n = identity["cfg"]["n_examples"]
    if state["examples_seen"] != n:
        raise ValueError(
            f"{run_dir} is unfinished ({state['examples_seen']} of {n} examples): finish it by "
            f"re-running its main-job command, which resumes"
        )
    return state, identity


def _loss(label: str) -> PreferenceLoss:
    known = [PreferenceLoss("dpo"), PreferenceLoss("ipo")]
    known += [PreferenceLoss(n, "jensen_shannon", f) for n in ("iupo",) for f in ("paper", "kkt")]
    for loss in known:
        if loss.label == label:
            return loss
    raise ValueError(f"cannot rebuild the loss {label!r}; known: {[k.label for k in known]}")


def _starting_policy(model, identity: dict, run_dir: Path, tokens, pad: int, batch: int, device):
    """(pi_ref of the run, the pairs as its phase takes them, the phase class): the model as built
    or the run's SFT model; for a partially fine-tuned model the top of it (SFT'd, if the run's
    was), with the pairs' trunk states cached beside the run (refused when the installed weights
    are not the run's)."""
    model_cfg = _config(ModelConfig, identity["model"])
    if model_cfg.train_layers is None:
        _load_sft(model, identity, run_dir)
        return model, tokens, PreferencePhase
    if identity.get("weights") != model_fingerprint(model):
        raise ValueError(
            f"the installed {model_cfg.name_or_path!r} has other weights than the model "
            f"{run_dir} started from: install the package version the run used"
        )
    top, cached = cache_trunk(
        model,
        model_cfg.train_layers,
        {"pairs": tokens},
        run_dir.parent / "trunk_cache",
        pad,
        batch,
        device,
        precision=identity.get("trunk_precision", identity.get("precision", "auto")),
        cache_dtype=identity.get("cache_dtype", "float16"),
    )
    _load_sft(top, identity, run_dir)  # the SFT'd top, when the run's reference was SFT'd
    return top, cached["pairs"], CachedPreferencePhase


def _load_sft(model, identity: dict, run_dir: Path) -> None:
    """Load the grid's SFT model (``<run>/../sft``) into ``model`` when the run was SFT'd first."""
    if not identity["sft"]["n_examples"]:
        return
    path = run_dir.parent / "sft" / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} started from an SFT model but {path} is missing: score the run inside the "
            f"grid folder it was trained in"
        )
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])


def score_run(
    run_dir: str | Path,
    hh: str | Path | None = None,
    subsets=HH_LOCAL_SUBSETS,
    split: str = "test",
    part: str = "all",
    precision: str | None = None,
) -> dict:
    """Pairs scored, accuracy, its SE and mean margin of the final policy of ``run_dir``, and every
    pair's margin (``"margins"``, (N,) float64). ``precision`` replaces the run's own for the
    forward passes of pi and pi_ref (``phases.autocast``; the trunk cache keeps its own)."""
    return score_run_in(run_dir, (precision,), hh, subsets, split, part)[0]


def score_run_in(
    run_dir: str | Path,
    precisions: tuple[str | None, ...],
    hh: str | Path | None = None,
    subsets=HH_LOCAL_SUBSETS,
    split: str = "test",
    part: str = "all",
) -> list[dict]:
    """:func:`score_run` once per precision (None: the run's own), the data, model and trunk cache
    prepared once for all of them."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    for precision in precisions:
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    run_dir = Path(run_dir)
    state, identity = _identity(run_dir)
    model_cfg = _config(ModelConfig, identity["model"])
    data_cfg = _config(DataConfig, identity["data"])
    if data_cfg.compact_vocab is not None:
        raise ValueError(
            f"{run_dir} used a compact vocabulary built from its training data: its policy cannot "
            f"score other files"
        )
    pref = _config(PhaseConfig, identity["cfg"])
    keep = data_cfg.keep_identical
    pairs, _ = load_hh(hh or hh_dir(), split, subsets, drop_mismatched=True, keep_identical=keep)
    if part != "all":
        pairs = split_by_prompt_hash(pairs, data_cfg.eval_fraction)[part == "eval"]
    tokenizer = load_tokenizer(model_cfg)
    lengths = dict(max_length=data_cfg.max_length, max_prompt_length=data_cfg.max_prompt_length)
    tokens = tokenize_pairs(
        pairs, tokenizer, **lengths, truncation_mode=TRUNCATION["hh"], keep_identical=keep
    )
    if not tokens:
        raise ValueError(
            f"no pairs to score in {subsets} of {hh or hh_dir()} ({split}, part {part!r}): check "
            f"--hh-dir, --subsets, --split and --part"
        )
    model = build_model(model_cfg, len(tokenizer), data_cfg.max_length, tokenizer.pad_token_id)
    response_only = head_is_linear_readout(model, len(tokenizer))
    device, pad = torch.device("cpu"), tokenizer.pad_token_id
    model, tokens, phase_cls = _starting_policy(
        model, identity, run_dir, tokens, pad, pref.eval_batch_size, device
    )
    starting = copy.deepcopy(model.state_dict())  # pi_ref's weights
    partial = model_cfg.train_layers is not None
    collate = functools.partial(collate_cached, pad_id=pad) if partial else None
    average = identity.get("average_logps", False)
    longer = longer_response_rule(tokens)  # (N,) in the order the policy's pairs are scored
    results = []
    for precision in precisions:
        precision = precision or identity.get("precision", "auto")
        model.load_state_dict(starting)
        ref = reference_logps(
            model, tokens, pref.eval_batch_size, pad, device, collate=collate, precision=precision,
            average=average, response_only=response_only,
        )  # fmt: skip
        model.load_state_dict(state["model"])
        common = dict(pad_id=pad, average=average, response_only=response_only, precision=precision)
        phase = phase_cls(_loss(identity["loss"]), identity["beta"], {"eval": ref}, **common)
        metrics, every = evaluate(
            model, phase, tokens, pref.eval_batch_size, device, per_example=True
        )
        acc, n = metrics["rewards/accuracies"], len(tokens)
        correct = torch.as_tensor(every["rewards/accuracies"], dtype=torch.float64)  # (N,)
        results.append(
            {
                "run": str(run_dir),
                "pairs": n,
                "precision": precision,
                "accuracy": acc,
                "se": binomial_se(acc, n),
                "margin": metrics["rewards/margins"],
                "margins": every["rewards/margins"],
                "longer_accuracy": longer.mean().item(),
                "minus_longer": paired_difference(correct, longer),
            }
        )
    return results


@command
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m upo_ref.evaluate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("run_dir", help="one finished preference run, e.g. runs/smol/ipo_beta0.1")
    p.add_argument(
        "--hh-dir", help="folder of <subset>/<split>.jsonl.gz (default ../shared/data/hh-rlhf)"
    )
    p.add_argument("--subsets", default=",".join(HH_LOCAL_SUBSETS), help="comma-separated subsets")
    p.add_argument("--split", default="test", help="file name stem: <subset>/<split>.jsonl.gz")
    p.add_argument(
        "--part", choices=PARTS, default="all", help="which side of the prompt-hash split"
    )
    p.add_argument("--precision", choices=PRECISIONS, help="forward passes' (default: the run's)")
    p.add_argument(
        "--against",
        choices=PRECISIONS,
        help="score again in this precision and compare the two, pair by pair",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    subsets = tuple(s for s in args.subsets.split(",") if s)
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = (args.precision, args.against) if args.against else (args.precision,)
    runs = score_run_in(args.run_dir, precisions, args.hh_dir, subsets, args.split, args.part)
    out = runs[0]
    for r in runs:
        print(
            f"{r['run']} ({r['precision']}): {r['pairs']} pairs scored, accuracy "
            f"{r['accuracy']:.4f} +- {r['se']:.4f}, mean margin {r['margin']:.4f}"
        )
    d, se = out["minus_longer"]
    print(
        f"the longer response is the chosen one in {out['longer_accuracy']:.4f} +- "
        f"{binomial_se(out['longer_accuracy'], out['pairs']):.4f} of the pairs; the policy's "
        f"accuracy minus that, paired: {d:+.4f} +- {se:.4f}"
    )
    if args.against:
        out["agreement"] = compare_margins(runs[0]["margins"], runs[1]["margins"])
        a = out["agreement"]
        print(
            f"{runs[0]['precision']} against {runs[1]['precision']}: the margin's sign agrees on "
            f"{a['sign_agreement']:.4f} of the pairs; std of the margin difference "
            f"{a['difference_std']:.4g}, of the margins {a['std_a']:.4g} and {a['std_b']:.4g}"
        )
    return out


def longer_response_rule(pairs) -> torch.Tensor:
    """(N,) float64: per pair 1 if its chosen response has more tokens than its rejected one, 0 if
    fewer, 1/2 if as many (a tie counts half, as in ``metrics.preference_metrics``). Its mean is
    the accuracy of "the longer response is preferred"."""
    lengths = torch.tensor([[len(p.chosen), len(p.rejected)] for p in pairs], dtype=torch.float64)
    if not len(lengths):
        raise ValueError("no pairs to score")
    return (torch.sign(lengths[:, 0] - lengths[:, 1]) + 1) / 2


def compare_margins(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How two scorings of the same pairs agree: the fraction of pairs whose margins have the same
    sign (a zero margin is its own sign), the standard deviation of a - b, and of each."""
    if a.shape != b.shape or a.dim() != 1 or not len(a):
        raise ValueError(f"need two (N,) margin tensors of one shape, got {a.shape}, {b.shape}")
    return {
        "sign_agreement": (torch.sign(a) == torch.sign(b)).double().mean().item(),
        "difference_std": (a - b).std().item() if len(a) > 1 else 0.0,
        "std_a": a.std().item() if len(a) > 1 else 0.0,
        "std_b": b.std().item() if len(b) > 1 else 0.0,
    }


if __name__ == "__main__":
    main()
