"""Partial fine-tuning on a tiny random Llama: the split model computes exactly what the whole model
does (values and gradients), the trunk cache is used, keyed and invalidated, the cached phase
trains and resumes exactly, and the smol preset runs end to end (smoke) without touching tracked
files."""

from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import json

import pytest
import torch

from upo_ref.evaluate import longer_response_rule, score_run
from upo_ref.evaluate import main as evaluate_main
from upo_ref.experiments.by_reference import (
    by_reference_of_results,
    render_by_reference,
    split_by_reference,
)
from upo_ref.lm import trunk_cache
from upo_ref.lm.config import TINY_LLAMA, ModelConfig, PhaseConfig
from upo_ref.lm.data import load_hh
from upo_ref.lm.experiment_data import _first, prepare_data
from upo_ref.lm.logprobs import concatenated_logps
from upo_ref.lm.models import build_model, load_tokenizer
from upo_ref.lm.partial import split_model, trainable_parameters
from upo_ref.lm.presets import get_preset, smoke
from upo_ref.lm.split import split_by_prompt_hash
from upo_ref.lm.tokenize import TokenizedPair, collate_pairs
from upo_ref.lm.train import (
    CHECKPOINT,
    FINAL_EVAL,
    SFTPhase,
    read_metrics,
    reference_logps,
    train,
)
from upo_ref.lm.trunk_cache import (
    CachedPreferencePhase,
    cached_pairs,
    collate_cached,
    model_fingerprint,
)
from upo_ref.losses import PreferenceLoss
from upo_ref.reproduce import main
from upo_ref.utils.paths import REPO_ROOT, hh_dir
from upo_ref.utils.stats import paired_difference

CPU = torch.device("cpu")
VOCAB = 97
EXACT_FLOAT64 = 1e-10  # split vs whole model in float64: the same operations, reassociated at most
FLOAT16_CACHE = 2e-2  # log-probs from float16-stored states vs float32 ones, nats per sequence
FLOAT32_STATES = 1e-6  # relative: a float64 top fed float32-rounded trunk states (as collated)


def tiny_llama(n_layer=3, seed=0):
    cfg = ModelConfig(TINY_LLAMA, n_layer=n_layer, n_head=2, n_embd=16, init_seed=seed)
    return build_model(cfg, VOCAB, 64, eos_id=VOCAB - 1)


def random_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return tuple(torch.randint(0, VOCAB - 1, (k,), generator=g).tolist())

    return [TokenizedPair(ids(2, 9), ids(1, 7) + (VOCAB - 1,), ids(1, 7)) for _ in range(n)]


def test_split_model_gives_the_whole_models_logps_and_gradients():
    pairs = random_pairs(6)
    whole = tiny_llama().double().eval()
    top = tiny_llama().double().eval()
    trunk, top = split_model(top, 1)
    batch = collate_pairs(pairs, range(6), VOCAB - 1)
    with torch.no_grad():
        h = trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    batch_top = {**batch, "inputs_embeds": h.last_hidden_state}
    pc, pr = concatenated_logps(whole, batch)
    qc, qr = concatenated_logps(top, batch_top)
    assert torch.allclose(pc, qc, atol=EXACT_FLOAT64, rtol=0)
    assert torch.allclose(pr, qr, atol=EXACT_FLOAT64, rtol=0)
    (pc - pr).sum().backward()
    (qc - qr).sum().backward()
    for (name, p), q in zip(
        whole.model.layers[2].named_parameters(), top.model.layers[0].parameters(), strict=True
    ):
        assert torch.allclose(p.grad, q.grad, atol=EXACT_FLOAT64, rtol=0), name
    assert torch.allclose(whole.model.norm.weight.grad, top.model.norm.weight.grad, atol=1e-10)


def test_split_trains_only_the_top_layers_and_the_final_norm():
    model = tiny_llama(n_layer=3)
    trunk, top = split_model(model, 2)
    assert len(trunk.layers) == 1 and len(top.model.layers) == 2
    trained = {n for n, p in top.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.layers.", "model.norm.")) for n in trained)
    layer = sum(p.numel() for p in top.model.layers.parameters())
    assert trainable_parameters(top) == layer + top.model.norm.weight.numel()
    assert not any(p.requires_grad for p in trunk.parameters())  # embeddings, bottom layer: frozen


def test_split_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="train_layers must be in 1..2"):
        split_model(tiny_llama(n_layer=3), 3)
    gpt2 = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=16), VOCAB, 64)
    with pytest.raises(ValueError, match="Llama-family"):
        split_model(gpt2, 1)
    with pytest.raises(ValueError, match="train_layers must be None"):
        ModelConfig(TINY_LLAMA, train_layers=0)


def trunk_of(seed=0):
    return split_model(tiny_llama(seed=seed), 1)


def test_cache_is_computed_once_then_loaded(tmp_path, monkeypatch):
    pairs = random_pairs(5)
    trunk, top = trunk_of()
    first = cached_pairs(trunk, pairs, tmp_path, VOCAB - 1, 4, CPU, cache_dtype="float32")
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("the trunk ran again although its states are cached")

    monkeypatch.setattr(trunk_cache, "trunk_states", must_not_run)
    again = cached_pairs(trunk, pairs, tmp_path, VOCAB - 1, 4, CPU, cache_dtype="float32")
    for a, b, p in zip(first, again, pairs, strict=True):
        assert torch.equal(a.hidden_chosen, b.hidden_chosen)
        assert a.hidden_chosen.shape == (len(p.prompt) + len(p.chosen), 16)
        assert (a.prompt, a.chosen, a.rejected) == (p.prompt, p.chosen, p.rejected)
    # The states are the trunk's, row by row, whatever the batch they were computed in.
    for cp in first:
        ids = torch.tensor([cp.prompt + cp.rejected])
        with torch.no_grad():
            h = trunk(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        assert torch.allclose(cp.hidden_rejected, h, atol=1e-5, rtol=0)


def test_cache_key_changes_with_weights_data_dtype_and_precision(tmp_path):
    pairs = random_pairs(4)
    trunk, _ = trunk_of()
    args = (VOCAB - 1, 4, CPU)
    cached_pairs(trunk, pairs, tmp_path, *args)
    cached_pairs(trunk, pairs[:3], tmp_path, *args)  # other data
    cached_pairs(trunk, pairs, tmp_path, *args, cache_dtype="float32")  # other storage
    cached_pairs(trunk, pairs, tmp_path, *args, precision="bfloat16")  # other compute
    other, _ = trunk_of(seed=1)
    assert model_fingerprint(other) != model_fingerprint(trunk)
    cached_pairs(other, pairs, tmp_path, *args)  # other weights
    assert len(list(tmp_path.glob("*.pt"))) == 5
    with torch.no_grad():  # one weight changed in place: a new key too
        trunk.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    cached_pairs(trunk, pairs, tmp_path, *args)
    assert len(list(tmp_path.glob("*.pt"))) == 6


def test_cache_key_changes_with_how_the_pass_was_computed(tmp_path, monkeypatch):
    """A bf16 pass rounds differently with the thread count and the batches, so a cache is reused
    only by a pass computed the same way: same threads, same batch size, same torch and device."""
    pairs = random_pairs(4)
    trunk, _ = trunk_of()
    threads = torch.get_num_threads()
    other_threads = 1 if threads > 1 else 2
    try:
        cached_pairs(trunk, pairs, tmp_path, VOCAB - 1, 4, CPU)
        torch.set_num_threads(other_threads)
        cached_pairs(trunk, pairs, tmp_path, VOCAB - 1, 4, CPU)  # other thread count
        assert len(list(tmp_path.glob("*.pt"))) == 2
    finally:
        torch.set_num_threads(threads)
    cached_pairs(trunk, pairs, tmp_path, VOCAB - 1, 3, CPU)  # other batch size
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert trunk_cache.compute_identity(CPU, 4) == {
        "torch": torch.__version__,
        "batch_size": 4,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
    }

    def must_not_run(*a, **k):
        raise AssertionError("the trunk ran again although the same pass is cached")

    monkeypatch.setattr(trunk_cache, "trunk_states", must_not_run)  # back to the first: a hit
    cached_pairs(trunk, pairs, tmp_path, VOCAB - 1, 4, CPU)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    with pytest.raises(AssertionError, match="ran again"):
        cached_pairs(trunk, pairs, tmp_path, VOCAB - 1, 4, CPU)  # another torch: a miss


def test_float16_cache_is_close_and_an_overflow_is_an_error(tmp_path):
    pairs = random_pairs(4)
    trunk, top = trunk_of()
    top.eval()
    logps = {}
    for dtype in ("float16", "float32"):
        cp = cached_pairs(trunk, pairs, tmp_path, VOCAB - 1, 4, CPU, cache_dtype=dtype)
        with torch.no_grad():
            logps[dtype] = concatenated_logps(top, collate_cached(cp, range(4), VOCAB - 1))
    for a, b in zip(logps["float16"], logps["float32"], strict=True):
        assert torch.allclose(a, b, atol=FLOAT16_CACHE, rtol=0)
    with torch.no_grad():
        trunk.embed_tokens.weight.mul_(1e6)  # states far beyond float16's 65504
    with pytest.raises(ValueError, match="does not fit torch.float16"):
        cached_pairs(trunk, pairs, tmp_path / "big", VOCAB - 1, 4, CPU)


def test_collate_cached_pads_states_with_zeros():
    pairs = random_pairs(3)
    states = [torch.full((len(p.prompt) + len(p.chosen), 16), 1.0) for p in pairs]
    rej = [torch.full((len(p.prompt) + len(p.rejected), 16), 2.0) for p in pairs]
    cp = [
        trunk_cache.CachedPair(p.prompt, p.chosen, p.rejected, s, r)
        for p, s, r in zip(pairs, states, rej, strict=True)
    ]
    batch = collate_cached(cp, [0, 1, 2], VOCAB - 1)
    embeds, mask = batch["inputs_embeds"], batch["attention_mask"]
    assert embeds.shape == (6, mask.shape[1], 16)
    assert torch.equal(embeds[:3][mask[:3] == 1], torch.ones(int(mask[:3].sum()), 16))
    assert torch.equal(embeds[3:][mask[3:] == 1], torch.full((int(mask[3:].sum()), 16), 2.0))
    assert not embeds[mask == 0].any()
    with pytest.raises(ValueError, match="trunk states"):
        collate_cached(pairs, [0, 1, 2], VOCAB - 1)


def sft_targets(n: int, seed: int = 0) -> list[TokenizedPair]:
    """SFT examples as ``tokenize_sft`` makes them: rejected = chosen = the target."""
    return [TokenizedPair(p.prompt, p.chosen, p.chosen) for p in random_pairs(n, seed)]


def test_sft_on_the_cached_top_is_the_whole_models_sft_loss_and_gradients():
    examples = sft_targets(6)
    whole = tiny_llama().double().eval()
    trunk, top = split_model(tiny_llama().double().eval(), 1)
    cached = []
    for e in examples:  # the trunk's float64 states of x + y, as cached_targets attaches them
        ids = torch.tensor([e.prompt + e.chosen])
        with torch.no_grad():
            h = trunk(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        cached.append(trunk_cache.CachedPair(e.prompt, e.chosen, e.rejected, h, None))
    ours = trunk_cache.CachedSFTPhase(pad_id=VOCAB - 1)
    theirs = SFTPhase(pad_id=VOCAB - 1)
    loss_top, m_top = ours.losses(top, ours.collate(cached, range(6)), "train")  # (6,)
    loss_whole, m_whole = theirs.losses(whole, theirs.collate(examples, range(6)), "train")
    # The collated states are float32 (as from the float16 cache), the rest float64.
    assert torch.allclose(loss_top, loss_whole, atol=0, rtol=FLOAT32_STATES)
    assert torch.allclose(m_top["nll_per_token"], m_whole["nll_per_token"], rtol=FLOAT32_STATES)
    loss_top.sum().backward()
    loss_whole.sum().backward()
    for (name, p), q in zip(
        whole.model.layers[2].named_parameters(), top.model.layers[0].parameters(), strict=True
    ):
        assert (p.grad - q.grad).abs().max() <= FLOAT32_STATES * p.grad.abs().max(), name
    with pytest.raises(ValueError, match="trunk states"):
        ours.collate(examples, range(6))


def test_sft_targets_have_a_cache_of_their_own_computed_once(tmp_path, monkeypatch):
    examples = sft_targets(5)
    trunk, _ = trunk_of()
    args = (tmp_path, VOCAB - 1, 4, CPU)
    pairs = cached_pairs(trunk, examples, *args)
    first = trunk_cache.cached_targets(trunk, examples, *args)
    assert len(list(tmp_path.glob("*.pt"))) == 2  # the same ids as pairs are another entry
    assert all(c.hidden_rejected is None for c in first)  # SFT reads x + y only
    for a, b in zip(pairs, first, strict=True):  # the same states as the pairs' chosen side
        assert torch.equal(a.hidden_chosen, b.hidden_chosen)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the trunk ran again although its states are cached")

    monkeypatch.setattr(trunk_cache, "trunk_states", must_not_run)
    again = trunk_cache.cached_targets(trunk, examples, *args)
    assert all(
        torch.equal(a.hidden_chosen, b.hidden_chosen) for a, b in zip(first, again, strict=True)
    )
    with pytest.raises(ValueError, match="share the names"):
        trunk_cache.cache_trunk(
            tiny_llama(), 1, {"a": examples}, tmp_path, VOCAB - 1, 4, CPU, targets={"a": examples}
        )


class Interrupted(RuntimeError):
    pass


class InterruptAtCall:
    """The loss, raising Interrupted at its n-th call (a run killed mid-way)."""

    def __init__(self, loss, n):
        self.loss, self.n, self.calls = loss, n, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise Interrupted
        return self.loss(*args)


def test_cached_phase_trains_and_resumes_exactly(tmp_path):
    trunk, top = trunk_of()
    splits = {"train": random_pairs(16, 0), "eval": random_pairs(8, 1)}
    cached = {s: cached_pairs(trunk, ps, tmp_path, VOCAB - 1, 8, CPU) for s, ps in splits.items()}
    collate = functools.partial(collate_cached, pad_id=VOCAB - 1)
    ref = {
        s: reference_logps(top, ps, 8, VOCAB - 1, CPU, collate=collate) for s, ps in cached.items()
    }
    cfg = PhaseConfig(n_examples=32, batch_size=4, eval_every=8, lr=1e-2, optimizer="adamw")

    def run(out, loss):
        model = copy.deepcopy(top)
        phase = CachedPreferencePhase(loss, 0.1, ref, VOCAB - 1)
        final = train(model, phase, cached["train"], cached["eval"], cfg, out, CPU, progress=False)
        return model, final

    straight, final = run(tmp_path / "a", PreferenceLoss("ipo"))
    assert (
        final["rewards/margins"] != 0.0
        and final["loss"] != read_metrics(tmp_path / "a" / "metrics.jsonl")[0]["loss"]
    )  # the top layer did move
    # Calls: eval at 0, two steps, eval at 8, ..., eval at 24, step 7, step 8 = call 12.
    with pytest.raises(Interrupted):
        run(tmp_path / "b", InterruptAtCall(PreferenceLoss("ipo"), 12))
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["examples_seen"] == 24
    resumed, _ = run(tmp_path / "b", PreferenceLoss("ipo"))
    a, b = (read_metrics(tmp_path / x / "metrics.jsonl") for x in "ab")
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in a]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("time/")} for r in b]
    for (name, p), q in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name


def test_smol_preset_is_the_grid_of_the_issue():
    cfg = get_preset("smol")
    assert cfg.model.train_layers and cfg.sft.n_examples == 0 and cfg.data.n_eval_pairs is None
    runs = [(f.label, b) for f, b in cfg.runs()]
    assert runs == [
        ("IPO", 0.1), ("IPO", 0.2), ("IPO", 0.5),
        ("JS-IUPO", 0.1), ("JS-IUPO", 0.2), ("JS-IUPO", 0.5),
        ("JS-IUPO (kkt)", 0.1), ("DPO", 0.1),
    ]  # fmt: skip
    assert smoke(cfg).model.name_or_path == TINY_LLAMA


def test_smol_average_is_smols_ipo_and_js_iupo_at_beta_0_1_on_mean_log_probs():
    smol, average = get_preset("smol"), get_preset("smol-average")
    assert [(f.label, b) for f, b in average.runs()] == [("IPO", 0.1), ("JS-IUPO", 0.1)]
    assert average.average_logps and not smol.average_logps
    same = ("model", "data", "sft", "pref", "precision", "trunk_precision", "cache_dtype")
    assert all(getattr(average, k) == getattr(smol, k) for k in same)  # the same trunk cache


def test_smol_sft_is_smols_ipo_and_js_iupo_at_beta_0_1_from_an_sft_reference():
    smol, sft = get_preset("smol"), get_preset("smol-sft")
    assert [(f.label, b) for f, b in sft.runs()] == [("IPO", 0.1), ("JS-IUPO", 0.1)]
    assert sft.sft.n_examples == sft.data.n_sft_examples == 2048 and smol.sft.n_examples == 0
    assert sft.sft.lr == smol.pref.lr and sft.sft.batch_size == smol.pref.batch_size
    same = ("model", "pref", "average_logps", "precision", "trunk_precision", "cache_dtype")
    assert all(getattr(sft, k) == getattr(smol, k) for k in same)
    assert dataclasses.replace(sft.data, n_sft_examples=smol.data.n_sft_examples) == smol.data


def test_smol_sft_smoke_trains_the_reference_first_and_evaluate_scores_from_it(tmp_path):
    cfg = smoke(get_preset("smol-sft"))
    out = tmp_path / "run"
    args = ["--preset", "smol-sft", "--smoke", "--out", str(out), "--no-progress"]
    results = main(args + ["--device", "cpu"])
    sft = read_metrics(out / "sft" / "metrics.jsonl")
    assert [m["examples_seen"] for m in sft if m["split"] == "eval"] == [0, 8]
    # train, eval and the two SFT sets, each cached once; the summary says what SFT took.
    assert len(list((out / "trunk_cache").glob("*.pt"))) == 4
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert list(summary["seconds"])[:3] == ["trunk_s", "sft_s", "reference_s"]
    assert summary["sft_final"]["nll_per_token"] == pytest.approx(
        [m for m in sft if m["split"] == "eval"][-1]["nll_per_token"], abs=1e-12
    )
    # The runs start from the SFT model, pi_ref: their first step computes pi = pi_ref, margin 0.
    for r in results:
        step_1 = [m for m in read_metrics(r.metrics_path) if m["split"] == "train"][0]
        assert step_1["step"] == 1 and step_1["rewards/ties"] == 1.0
    # Rescoring a run's own eval pairs starts from the same SFT model, so gives its numbers.
    write_eval_pairs(cfg, tmp_path / "hh")
    run = out / "ipo_beta0.1"
    final, got = final_eval_and_rescored(run, tmp_path / "hh")
    assert got["accuracy"] == pytest.approx(final["rewards/accuracies"], abs=1e-12)
    assert got["margin"] == pytest.approx(final["rewards/margins"], abs=1e-6)
    (out / "sft" / CHECKPOINT).unlink()
    with pytest.raises(FileNotFoundError, match="started from an SFT model"):
        score_run(run, tmp_path / "hh", ("helpful-base",))


def test_smol_smoke_end_to_end_writes_only_under_its_run_folder(tmp_path):
    out = tmp_path / "run"
    tracked = sorted((REPO_ROOT / "results").rglob("*")) + sorted((REPO_ROOT / "figures").glob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in tracked}
    args = ["--preset", "smol", "--smoke", "--out", str(out), "--no-progress", "--device", "cpu"]
    results = main(args)
    assert {p: p.stat().st_mtime_ns for p in tracked} == stamps
    assert len(results) == 8 and (out / "figure1_smol-smoke.png").is_file()
    summary = json.loads((out / "results" / "summary.json").read_text())
    comparisons = {(c["b"], c["a"], c["beta"]) for c in summary["paired_comparisons"]}
    assert ("JS-IUPO", "IPO", 0.1) in comparisons and ("DPO", "IPO", 0.1) in comparisons
    assert set(summary["seconds"]) == {"trunk_s", "reference_s", "training_s", "evaluation_s"}
    splits = []
    for r in results:
        final = json.loads((r.metrics_path.parent / FINAL_EVAL).read_text())
        evals = [m for m in read_metrics(r.metrics_path) if m["split"] == "eval"]
        n = len(final["rewards/accuracies"])
        assert sum(final["rewards/accuracies"]) / n == pytest.approx(
            evals[-1]["rewards/accuracies"], abs=1e-12
        )
        splits.append(split_by_reference(r.label, r.beta, final))
    # The grid writes the split of every run, as the command computes it from its results.
    assert (out / "results" / "by_reference.md").read_text() == render_by_reference(splits)
    assert by_reference_of_results(out / "results") == splits
    assert len(list((out / "trunk_cache").glob("*.pt"))) == 2  # train and eval, computed once
    again = main(args)  # resumes: the cache and the finished runs are reused
    assert [r.final for r in again] == [r.final for r in results]
    assert len(list((out / "trunk_cache").glob("*.pt"))) == 2
    # smol-average has smol's model, data and precision: --trunk-cache shares smol's cache.
    cache = {p: p.stat().st_mtime_ns for p in (out / "trunk_cache").glob("*.pt")}
    shared = ["--preset", "smol-average", "--smoke", "--out", str(tmp_path / "average")]
    main(shared + ["--trunk-cache", str(out / "trunk_cache"), "--no-progress", "--device", "cpu"])
    assert {p: p.stat().st_mtime_ns for p in (out / "trunk_cache").glob("*.pt")} == cache
    assert not (tmp_path / "average" / "trunk_cache").exists()


def test_trunk_cache_is_refused_for_a_preset_that_caches_no_trunk(capsys):
    with pytest.raises(SystemExit):
        main(["--smoke", "--trunk-cache", "somewhere", "--no-progress"])
    assert "--trunk-cache: preset quick-smoke trains the whole model" in capsys.readouterr().err


def write_hh(root, pairs, subset="helpful-base"):
    """``pairs`` (PreferencePair) as an official-format file <root>/<subset>/test.jsonl.gz."""
    path = root / subset / "test.jsonl.gz"
    path.parent.mkdir(parents=True)
    rows = [{"chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected} for p in pairs]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def write_eval_pairs(cfg, root):
    """The eval pairs of experiment ``cfg`` (before tokenization) as an HH file under ``root``
    (helpful-base); returns the whole held-out side of the split."""
    pairs, _ = load_hh(hh_dir(), "test", cfg.data.hh_subsets, drop_mismatched=True)
    held_out = split_by_prompt_hash(pairs, cfg.data.eval_fraction)[1]
    write_hh(root, _first(held_out, cfg.data.n_eval_pairs, cfg.data.shuffle_seed, ""))
    return held_out


def final_eval_and_rescored(run, hh_root):
    """(the run's last eval record, ``evaluate``'s result on the helpful-base file of hh_root)."""
    final = [m for m in read_metrics(run / "metrics.jsonl") if m["split"] == "eval"][-1]
    return final, evaluate_main([str(run), "--hh-dir", str(hh_root), "--subsets", "helpful-base"])


def test_evaluate_rescores_a_finished_run_and_refuses_what_it_cannot_reproduce(tmp_path):
    cfg = smoke(get_preset("smol"))
    out = tmp_path / "run"
    main(["--preset", "smol", "--smoke", "--out", str(out), "--no-progress", "--device", "cpu"])
    # The run's own eval pairs, written out as an HH file: the command must give the run's numbers.
    held_out = write_eval_pairs(cfg, tmp_path / "hh")
    run = out / "js-iupo_beta0.1"
    final, got = final_eval_and_rescored(run, tmp_path / "hh")
    assert got["pairs"] == cfg.data.n_eval_pairs
    assert got["accuracy"] == pytest.approx(final["rewards/accuracies"], abs=1e-12)
    assert got["margin"] == pytest.approx(final["rewards/margins"], abs=1e-6)
    # The length rule on the same pairs, tokenized by the experiment's own pipeline.
    tokens = prepare_data(cfg, load_tokenizer(cfg.model)).pref_eval
    rule = sum(
        (len(p.chosen) > len(p.rejected)) + (len(p.chosen) == len(p.rejected)) / 2 for p in tokens
    )
    assert got["longer_accuracy"] == pytest.approx(rule / len(tokens), abs=1e-12)
    assert got["minus_longer"][0] == pytest.approx(got["accuracy"] - rule / len(tokens), abs=1e-12)
    # Pair by pair: the trainer's per-pair final eval (same pairs, same order) against the rule.
    per_pair = json.loads((run / FINAL_EVAL).read_text())["rewards/accuracies"]
    expected = paired_difference(per_pair, longer_response_rule(tokens))
    assert got["minus_longer"] == pytest.approx(expected, abs=1e-12)
    hh = ["--hh-dir", str(tmp_path / "hh"), "--subsets", "helpful-base"]
    with pytest.raises(ValueError, match="no pairs to score"):
        # Every row's two responses identical: all are dropped (and listed), none is left.
        write_hh(tmp_path / "same", [dataclasses.replace(p, rejected=p.chosen) for p in held_out])
        score_run(run, tmp_path / "same", ("helpful-base",))
    same = evaluate_main([str(run), *hh, "--precision", "float32", "--against", "float32"])
    assert same["agreement"]["sign_agreement"] == 1.0 and same["agreement"]["difference_std"] == 0
    with pytest.raises(ValueError, match="precision must be one of"):
        score_run(run, tmp_path / "hh", ("helpful-base",), precision="float16")
    state = torch.load(run / CHECKPOINT, weights_only=False)
    for change, message in (
        (lambda s: s["identity"].update(weights="0" * 64), "other weights"),
        (lambda s: s.update(examples_seen=s["examples_seen"] - 4), "unfinished"),
        (lambda s: s["identity"].pop("loss"), "does not record"),
    ):
        bad = tmp_path / "bad" / message.replace(" ", "_")
        bad.mkdir(parents=True)
        changed = copy.deepcopy(state)
        change(changed)
        torch.save(changed, bad / CHECKPOINT)
        with pytest.raises(ValueError, match=message):
            score_run(bad, tmp_path / "hh", ("helpful-base",))


def test_step_0_evaluation_from_the_reference_equals_running_the_model(tmp_path):
    trunk, top = trunk_of()
    cached = {
        s: cached_pairs(trunk, random_pairs(n, seed), tmp_path, VOCAB - 1, 8, CPU)
        for s, n, seed in (("train", 8, 0), ("eval", 12, 1))
    }
    collate = functools.partial(collate_cached, pad_id=VOCAB - 1)
    ref = {
        s: reference_logps(top, ps, 5, VOCAB - 1, CPU, collate=collate) for s, ps in cached.items()
    }
    cfg = PhaseConfig(n_examples=4, batch_size=4, eval_every=4, lr=1e-2, eval_batch_size=5)
    first = {}
    for shortcut in (False, True):
        phase = CachedPreferencePhase(
            PreferenceLoss("iupo", "jensen_shannon"), 0.1, ref, VOCAB - 1,
            starts_at_reference=shortcut,
        )  # fmt: skip
        out = tmp_path / str(shortcut)
        train(copy.deepcopy(top), phase, cached["train"], cached["eval"], cfg, out, progress=False)
        record = read_metrics(out / "metrics.jsonl")[0]
        first[shortcut] = {k: v for k, v in record.items() if not k.startswith("time/")}
    assert first[True] == first[False]  # bit for bit, margins exactly 0
    assert first[True]["rewards/margins"] == 0.0


def test_runs_and_betas_select_part_of_the_grid():
    from upo_ref.reproduce import _parser, config_from_args

    def runs(*argv):
        cfg = config_from_args(_parser().parse_args(["--preset", "smol", *argv]))
        return [(loss.label, beta) for loss, beta in cfg.runs()]

    assert runs("--betas", "0.1") == [
        ("IPO", 0.1), ("JS-IUPO", 0.1), ("JS-IUPO (kkt)", 0.1), ("DPO", 0.1)
    ]  # fmt: skip
    assert runs("--runs", "js-iupo-kkt_beta0.1,ipo_beta0.5") == [
        ("JS-IUPO (kkt)", 0.1), ("IPO", 0.5)
    ]  # fmt: skip
    # config_from_args raises ValueError; the command turns it into a usage error (exit 2)
    with pytest.raises(ValueError, match="no run"):
        runs("--runs", "ipo_beta0.3")
    with pytest.raises(ValueError, match="no run at these betas"):
        runs("--betas", "0.3")


def test_the_trunk_runs_in_its_own_precision_and_the_top_in_the_phases(tmp_path, monkeypatch):
    import dataclasses

    from upo_ref.lm.experiment import load_experiment_data, prepare_reference

    seen = []
    real = trunk_cache.trunk_states

    def spy(trunk, sequences, pad_id, batch_size, device, precision="auto", dtype=None):
        seen.append(precision)
        return real(trunk, sequences, pad_id, batch_size, device, precision, dtype)

    monkeypatch.setattr(trunk_cache, "trunk_states", spy)
    cfg = smoke(get_preset("smol"))
    cfg = dataclasses.replace(cfg, precision="float32", trunk_precision="bfloat16")
    _, data = load_experiment_data(cfg)
    ref = prepare_reference(cfg, data, tmp_path, CPU, progress=False)
    assert seen == ["bfloat16", "bfloat16"]  # the train and the eval split's trunk states
    assert ref.logps.precision == "float32" and ref.identity["trunk_precision"] == "bfloat16"
    with pytest.raises(ValueError, match="trunk_precision must be None"):
        dataclasses.replace(cfg, trunk_precision="float16")


def test_compare_margins_by_hand():
    from upo_ref.evaluate import compare_margins

    a, b = torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.tensor([2.0, 1.0, 0.0, -1.0])
    out = compare_margins(a, b)
    assert out["sign_agreement"] == 0.5  # pairs 0 and 2 (a zero margin matches a zero)
    assert out["difference_std"] == pytest.approx(torch.tensor([-1.0, -2.0, 0.0, 3.0]).std().item())
    with pytest.raises(ValueError, match="two \\(N,\\) margin tensors"):
        compare_margins(a, b[:3])


def test_longer_response_rule_scores_each_pair_by_its_response_lengths():
    pairs = [
        TokenizedPair((1,), (2, 3, 4), (5, 6)),  # chosen longer: right
        TokenizedPair((1,), (2,), (5, 6)),  # chosen shorter: wrong
        TokenizedPair((1, 2), (3, 4), (5, 6)),  # as long: half
    ]
    assert longer_response_rule(pairs).tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="no pairs"):
        longer_response_rule([])


def test_trunk_precision_override_gets_its_own_run_folder_and_refuses_whole_model_presets():
    from upo_ref.reproduce import _parser, config_from_args

    def cfg(*argv):
        return config_from_args(_parser().parse_args(list(argv)))

    own = cfg("--preset", "smol", "--trunk-precision", "bfloat16")  # the preset's own: unchanged
    assert own == get_preset("smol")
    assert own.trunk_pass_precision == "bfloat16" and own.precision == "float32"
    assert dataclasses.replace(own, trunk_precision=None).trunk_pass_precision == "float32"
    other = cfg("--preset", "smol", "--trunk-precision", "float32")
    assert (other.name, other.trunk_precision) == ("smol-trunk-float32", "float32")
    assert dataclasses.replace(other, name="smol", trunk_precision="bfloat16") == own
    seeded = cfg("--preset", "smol", "--data-seed", "1", "--trunk-precision", "float32")
    assert seeded.name == "smol-seed1-trunk-float32"
    with pytest.raises(ValueError, match="trains the whole model and has no trunk"):
        cfg("--preset", "quick", "--trunk-precision", "float32")


def test_precision_override_changes_the_trained_part_only_and_gets_its_own_run_folder():
    from upo_ref.reproduce import _parser, config_from_args

    def cfg(*argv):
        return config_from_args(_parser().parse_args(list(argv)))

    assert cfg("--preset", "smol", "--precision", "float32") == get_preset("smol")  # its own
    top = cfg("--preset", "smol", "--precision", "bfloat16")
    assert (top.name, top.precision, top.trunk_pass_precision) == (
        "smol-bfloat16",
        "bfloat16",
        "bfloat16",  # the trunk's, so its cache is the preset's
    )
    assert dataclasses.replace(top, name="smol", precision="float32") == get_preset("smol")
    both = cfg("--preset", "smol", "--precision", "bfloat16", "--trunk-precision", "float32")
    assert (both.name, both.precision, both.trunk_pass_precision) == (
        "smol-trunk-float32-bfloat16",
        "bfloat16",
        "float32",
    )
    whole = cfg("--preset", "quick", "--precision", "float32")  # no trunk: the whole model
    quick = get_preset("quick")
    assert quick.precision != "float32" and whole.trunk_precision is None
    assert dataclasses.replace(whole, name="quick", precision=quick.precision) == quick
    with pytest.raises(SystemExit):  # argparse: not one of the precisions
        cfg("--preset", "smol", "--precision", "float16")


def test_a_bf16_trunk_on_a_cpu_without_bf16_kernels_is_warned_of(tmp_path, monkeypatch, capsys):
    from upo_ref.reproduce import main
    from upo_ref.utils import cpu

    cuda = torch.device("cuda")
    assert cpu.slow_bf16_warning("bfloat16", cuda, "x") is None  # CUDA has its own bf16
    monkeypatch.setattr(cpu, "bf16_matmul_kernels", lambda: True)
    assert cpu.slow_bf16_warning("bfloat16", CPU, "x") is None
    monkeypatch.setattr(cpu, "bf16_matmul_kernels", lambda: False)
    assert cpu.slow_bf16_warning("float32", CPU, "x") is None
    assert "x runs in bfloat16" in cpu.slow_bf16_warning("bfloat16", CPU, "x")
    args = ["--preset", "smol", "--smoke", "--runs", "ipo_beta0.1", "--no-progress"]
    args += ["--device", "cpu"]
    assert smoke(get_preset("smol")).trunk_precision == "bfloat16"
    main(args + ["--out", str(tmp_path / "bf16")])
    err = capsys.readouterr().err
    assert "the trunk's pass over" in err and "runs in bfloat16" in err
    assert "--trunk-precision float32" in err
    main(args + ["--out", str(tmp_path / "bf16"), "--fresh"])  # the trunk cache is kept: no pass
    assert "bfloat16" not in capsys.readouterr().err
    main(args + ["--out", str(tmp_path / "fp32"), "--trunk-precision", "float32"])
    assert "bfloat16" not in capsys.readouterr().err
