"""Cost levers beside INT8: Δ-caching of the back blocks at sampling (samplers.cache) and best-of-N with a
verifier (bestof)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from ditkit.condition import Condition
from ditkit.errors import UsageError
from ditkit.models import build_model, model_config
from ditkit.samplers.cache import DeltaCache, check_cache_interval, front_blocks


def random_net(depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    net = build_model(model_config("DiT-T/4", depth=depth, hidden_size=64, num_heads=2))
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return net.eval().requires_grad_(False)


def inputs(batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    t = torch.rand(batch, generator=g)
    return x, t, Condition.from_labels(torch.arange(batch) % 10, 10)


# ---- Δ-caching ----------------------------------------------------------------------------------
def test_a_full_evaluation_is_the_network_itself():
    net = random_net()
    x, t, cond = inputs()
    cached = DeltaCache(net, interval=2)
    assert torch.equal(cached(x, t, cond), net(x, t, cond))
    assert (cached.full, cached.cached) == (1, 0)


def test_a_cached_evaluation_runs_the_front_blocks_and_adds_the_kept_delta():
    net = random_net(depth=4)
    assert front_blocks(4) == 1 and front_blocks(12) == 3 and front_blocks(28) == 7
    cached = DeltaCache(net, interval=2)
    x, t, cond = inputs()
    full = cached(x, t, cond)
    # the same input again: front + Δ(same input) is the full trunk up to rounding
    again = cached(x, t, cond)
    assert cached.cached == 1 and torch.allclose(again, full, atol=1e-5)
    # a new input: block 1 sees it, blocks 2-4 contribute the Δ of the previous input
    x2, t2, _ = inputs(seed=2)
    full_net = net(x2, t2, cond)
    cached(x2, t2, cond)  # full (third call)
    reuse = cached(x, t, cond)  # cached: Δ from (x2, t2)
    mods = net.modulations(t, cond)
    h = net.x_embedder(x) + net.pos_embed
    h = net.blocks[0](h, mod=mods[0])
    h2 = net.x_embedder(x2) + net.pos_embed
    h2 = net.blocks[0](h2, mod=net.modulations(t2, cond)[0])
    delta = cached._delta[4]
    hand = net.final_layer(h + delta, mod=mods[-1])
    from ditkit.models.layers import unpatchify
    assert torch.allclose(reuse, unpatchify(hand, 4, 1, 28, 28), atol=1e-6)
    assert not torch.allclose(reuse, full_net, atol=1e-3)
    assert delta.shape == h2.shape == (4, 49, 64)


def test_every_kth_evaluation_is_full_per_batch_size():
    net = random_net(depth=2)
    cached = DeltaCache(net, interval=3)
    for _ in range(7):
        cached(*inputs(batch=4))
    assert (cached.full, cached.cached) == (3, 4)
    cached(*inputs(batch=8))  # a guided call of 2B: its own entry, computed in full
    assert cached.full == 4


def test_bad_intervals_and_networks_get_one_clear_error():
    net = random_net(depth=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="--cache-interval"):
            check_cache_interval(net, bad)
    check_cache_interval(nn.Linear(2, 2), 1)  # off: any network
    with pytest.raises(UsageError, match="needs a DiT-style trunk"):
        check_cache_interval(nn.Linear(2, 2), 2)
    with pytest.raises(UsageError, match="needs a DiT-style trunk"):
        DeltaCache(random_net(depth=1), 2)


# ---- best-of-N ----------------------------------------------------------------------------------
class _Model:
    """What the verifiers read of a LoadedModel."""
    num_classes = 10
    image_shape = (1, 28, 28)


def test_best_of_keeps_the_candidate_the_classifier_reads_as_the_asked_digit():
    from ditkit.bestof import best_of_batch, candidate_seeds
    from ditkit.data.mnist import load_mnist

    images, digits = load_mnist("test")
    asked = [3, 7, 1]
    wrong = [int(np.flatnonzero(digits == (a + 5) % 10)[0]) for a in asked]
    right = [int(np.flatnonzero(digits == a)[0]) for a in asked]
    pick = {}  # seed -> test-set index: the images' own draws are other digits, one later candidate is right
    cands = candidate_seeds([11, 12, 13], 3)
    for k, seeds in enumerate(cands):
        for i, s in enumerate(seeds):
            pick[s] = right[i] if k == (i % 2) + 1 else wrong[i]

    def draw(labels, seeds):
        x = torch.from_numpy(images[[pick[s] for s in seeds]]).float() / 127.5 - 1
        return x.unsqueeze(1)

    stats = {}
    out = best_of_batch(_Model(), asked, [11, 12, 13], 3, "classifier", draw, stats)
    expect = torch.from_numpy(images[right]).float().unsqueeze(1) / 127.5 - 1
    assert torch.equal(out, expect)
    assert stats == {"candidates": 9, "verifier_nfe": 0}
    # best-of-1 is the plain draw, and candidate 0's seeds are the images' own
    assert cands[0] == [11, 12, 13] and len({*cands[1], *cands[2]}) == 6
    assert torch.equal(best_of_batch(_Model(), asked, [11, 12, 13], 1, "classifier", draw), draw(asked, [11, 12, 13]))


def test_best_of_bad_input_gets_one_clear_error():
    from ditkit.bestof import check_best_of

    for bad in (0, -2, 2.5):
        with pytest.raises(UsageError, match="--best-of"):
            check_best_of(_Model(), bad, "implicit")
    with pytest.raises(UsageError, match="--verifier 'clip': allowed implicit, classifier"):
        check_best_of(_Model(), 4, "clip")
    m = _Model()
    m.num_classes = 0
    with pytest.raises(UsageError, match="unconditional"):
        check_best_of(m, 4, "implicit")
    m = _Model()
    m.image_shape = (3, 32, 32)
    with pytest.raises(UsageError, match="--verifier implicit"):
        check_best_of(m, 4, "classifier")
    check_best_of(m, 4, "implicit")


# ---- the memory-aware batch finder ----------------------------------------------------------------
def test_parse_bytes_and_its_errors():
    from ditkit.train.memory import parse_bytes

    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512 MB") == 512 * 10**6
    assert parse_bytes("1.5g") == 1_500_000_000 and parse_bytes("2048") == 2048
    for bad in ("lots", "4 GiBs", "-1GiB", "0", ""):
        with pytest.raises(UsageError, match="--memory-budget"):
            parse_bytes(bad)


def test_memory_plan_fits_the_budget_and_refuses_one_too_small_for_an_image():
    from ditkit.objectives import build_objective
    from ditkit.train.memory import HEADROOM, largest_batch, memory_plan, saved_bytes

    cfg = model_config("DiT-T/4", depth=2, hidden_size=64, num_heads=2).to_dict()
    obj = build_objective({"name": "linear", "prediction": "velocity", "time_sampling": "logit-normal",
                           "logit_mean": 0.0, "label_dropout": 0.1})
    cpu = torch.device("cpu")
    plan = memory_plan(cfg, obj, (1, 28, 28), "adamw", cpu, False, 2**30)
    fixed, per, base = plan["fixed_bytes"], plan["per_image_bytes"], plan["base_bytes"]
    n_params = sum(p.numel() for p in build_model(cfg).parameters())
    n_tensors = len(list(build_model(cfg).parameters()))
    # fp32 weights, gradients, EMA and AdamW's two moments; its step counter (a scalar) per tensor
    assert 0 <= fixed - 4 * n_params * 5 <= 8 * n_tensors
    # the activations are linear in the batch: the fit from batches 2 and 4 predicts batch 8
    net = build_model(cfg).train()
    assert abs(saved_bytes(net, obj, (1, 28, 28), 8, 10, cpu, False) - (base + 8 * per)) <= 0.02 * 8 * per
    assert plan["max_batch"] == int((2**30 * (1 - HEADROOM) - fixed - base) // per)
    assert largest_batch(int((fixed + base + 3.5 * per) / (1 - HEADROOM)), fixed, base, per) == 3
    with pytest.raises(UsageError, match=r"--memory-budget .*too small for one image"):
        memory_plan(cfg, obj, (1, 28, 28), "adamw", cpu, False, fixed)


# ---- gradient checkpointing and the memory budget in training -----------------------------------------
def _tiny_train(out, **kw):
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    cfg = TrainConfig(out=str(out), model="DiT-T/4", depth=2, width=64, heads=2, log_every=1, ckpt_every=0,
                      sample_every=0, progress=False, subset=256, warmup_steps=2, precision="fp32", compile=False,
                      **{"batch_size": 16, "max_steps": 4, **kw})
    return train(cfg)


def _losses(run):
    import json

    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grad_checkpoint_gives_bit_identical_losses_and_weights(tmp_path):
    import json

    from ditkit.runs import latest_checkpoint, load_weights

    plain = _tiny_train(tmp_path / "plain")
    ckpt = _tiny_train(tmp_path / "ckpt", grad_checkpoint=True)
    assert len(_losses(plain)) == 4 and _losses(plain) == _losses(ckpt)
    a, b = (load_weights(latest_checkpoint(r), "model") for r in (plain, ckpt))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((ckpt / "config.json").read_text())["train"]["grad_checkpoint"] is True


def test_checkpointing_runs_in_training_only():
    net = random_net(depth=2).train().requires_grad_(True)
    net.grad_checkpoint = True
    x, t, cond = inputs()
    calls = []
    # a pre-hook: the recomputation stops once it has what the backward needs, before the block returns
    hook = net.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    net(x, t, cond).square().mean().backward()
    assert len(calls) == 2  # the forward and its recomputation in the backward
    calls.clear()
    with torch.no_grad():
        net(x, t, cond)
    net.eval()
    net(x, t, cond).square().mean().backward()
    assert len(calls) == 2  # once each: no recomputation without training mode or gradients
    hook.remove()


def test_memory_budget_sets_the_auto_batch_and_is_recorded(tmp_path):
    import json

    from ditkit.objectives import build_objective
    from ditkit.train.memory import HEADROOM, memory_plan

    run = _tiny_train(tmp_path / "probe", batch_size=None, max_steps=1)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["memory"]["source"] == "default" and cfg["train"]["batch_size"] == 64  # the default budget: no cut
    plan = memory_plan(cfg["model"], build_objective(cfg["objective"]), (1, 28, 28), "muon", torch.device("cpu"),
                       False, 2**40)
    budget = int((plan["fixed_bytes"] + plan["base_bytes"] + 5.5 * plan["per_image_bytes"]) / (1 - HEADROOM))
    run = _tiny_train(tmp_path / "five", batch_size=None, max_steps=1, memory_budget=str(budget))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 5 and cfg["memory"]["max_batch"] == 5
    assert cfg["memory"]["budget_bytes"] == budget and cfg["memory"]["source"] == "--memory-budget"


def test_memory_budget_bad_input_is_one_clear_error(tmp_path, capsys):
    from ditkit.cli import main as cli_main

    base = ["train", "--out", str(tmp_path / "r"), "--depth", "1", "--width", "32", "--heads", "2", "--max-steps", "1",
            "--subset", "64", "--no-progress", "--sample-every", "0"]
    assert cli_main(base + ["--memory-budget", "64KiB"]) == 2
    err = capsys.readouterr().err
    assert "--memory-budget 64.00 KiB: too small for one image a step" in err and "Traceback" not in err
    assert cli_main(base + ["--memory-budget", "lots"]) == 2
    assert "--memory-budget 'lots': give a size like 4GiB" in capsys.readouterr().err
    assert cli_main(base + ["--memory-budget", "4MiB", "--batch-size", "64"]) == 2
    assert "holds at most batch" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before the run folder is written


# ---- through the settings object, generate and the CLI ------------------------------------------------
def test_generate_with_cache_interval_and_best_of(tiny_run):
    from ditkit.bestof import candidate_seeds, scores
    from ditkit.runs import load_model
    from ditkit.sampling import generate, sample_batch, to_uint8
    from ditkit.settings import SamplingSettings

    model = load_model(tiny_run)
    plain = generate(model, num=4, steps=4, seed=3)
    cached = generate(model, SamplingSettings(steps=4, cache_interval=2), num=4, seed=3)
    assert cached["nfe"] == plain["nfe"] and not np.array_equal(cached["images"], plain["images"])
    assert "front blocks only at 1 of 2" in cached["settings"].describe()
    best = generate(model, num=4, steps=4, seed=3, best_of=2, verifier="classifier")
    labels = [int(v) for v in best["labels"]]
    cands = [sample_batch(model, labels, s, SamplingSettings(steps=4)) for s in candidate_seeds(best["seeds"], 2)]
    assert np.array_equal(to_uint8(cands[0]), plain["images"])  # candidate 0 is the plain draw
    sc = torch.stack([scores(model, c, labels, s, "classifier") for c, s in zip(cands, candidate_seeds(best["seeds"], 2))])
    pick = sc.argmax(0)
    expect = np.stack([to_uint8(cands[int(k)][i:i + 1])[0] for i, k in enumerate(pick)])
    assert np.array_equal(best["images"], expect)


def test_settings_refuse_bad_cost_levers_by_field(tiny_run):
    from ditkit.runs import load_model
    from ditkit.settings import SamplingSettings, SettingsError

    model = load_model(tiny_run)
    for changes, field, flag in [(dict(cache_interval=0), "cache_interval", "--cache-interval"),
                                 (dict(best_of=0), "best_of", "--best-of"),
                                 (dict(verifier="clip"), "verifier", "--verifier"),
                                 (dict(best_of=2, reject=0.0), "best_of", "--best-of")]:
        with pytest.raises(SettingsError) as e:
            SamplingSettings(**changes).validate(model)
        assert e.value.field == field and str(e.value).startswith(flag)


def test_cli_cost_lever_flags(tiny_run, tmp_path, capsys):
    from ditkit.cli import main as cli_main

    out = tmp_path / "s.npz"
    assert cli_main(["sample", "--ckpt", str(tiny_run), "--out", str(out), "--num", "2", "--steps", "2",
                     "--cache-interval", "2", "--best-of", "2", "--verifier", "classifier"]) == 0
    assert "best of 2 by the classifier verifier" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(["sample", "--ckpt", str(tiny_run), "--out", str(out), "--cache-interval", "0"])
    assert e.value.code == 2 and "--cache-interval must be >= 1" in capsys.readouterr().err
