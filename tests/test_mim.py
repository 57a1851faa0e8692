"""The masked image model: the maskgit sampler (schedule, commitment, seeds, guidance), the mim network,
the masked objective with its tokenizer, and the model trained and sampled end to end through ditkit's
trainer and `generate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ditkit.condition import Condition
from ditkit.errors import DitkitError, UsageError
from ditkit.models.mim import MaskedTokenTransformer, MIMConfig
from ditkit.samplers.maskgit import guided_logits, mask_schedule, sample_maskgit
from ditkit.utils import ImageRNG

K = 16  # codebook of the toy networks


def toy_net(seed: int = 0, num_classes: int = 10) -> MaskedTokenTransformer:
    """A small mim network with weights large enough that its logits differ by token, class and position."""
    torch.manual_seed(seed)
    net = MaskedTokenTransformer(MIMConfig(codebook_size=K, depth=2, hidden_size=32, num_heads=2,
                                           num_classes=num_classes))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return net.eval().requires_grad_(False)


def run_sampler(net, labels, seeds, steps=12, scale=2.0, **options):
    states = []
    cond = Condition.from_labels(torch.tensor(labels), net.config.num_classes)
    tokens = sample_maskgit(guided_logits(net, cond, scale), len(seeds), 49, steps, mask_id=K, rng=ImageRNG(seeds),
                            callback=lambda s: states.append({k: v.clone() if torch.is_tensor(v) else v
                                                              for k, v in s.items()}), **options)
    return tokens, states


# ---- the maskgit sampler -----------------------------------------------------------------------------


def test_schedule_is_the_cosine_one_and_commits_every_token():
    plan = mask_schedule(49, 12)
    assert plan[-1] == 0 and all(a > b for a, b in zip([49] + plan, plan))
    assert plan == [min(math.floor(49 * math.cos(math.pi / 2 * t / 12)), 49 - t) for t in range(1, 13)]
    assert mask_schedule(49, 1) == [0]
    assert mask_schedule(49, 49) == list(range(48, -1, -1))  # one token a step


@pytest.mark.parametrize("steps", [0, -1, 50])
def test_steps_out_of_range_are_refused(steps):
    with pytest.raises(UsageError, match=f"--steps {steps}: the maskgit sampler needs 1 to 49 steps"):
        mask_schedule(49, steps)


def test_each_step_commits_the_planned_count_and_never_remasks():
    net = toy_net()
    tokens, states = run_sampler(net, [3, 5], [11, 12], steps=8)
    plan = mask_schedule(49, 8)
    before = [49] + plan
    for i, s in enumerate(states):
        assert s["committed"].sum(1).tolist() == [before[i] - plan[i]] * 2
        assert s["masked"].sum(1).tolist() == [plan[i]] * 2
        assert bool(((s["tokens"] == K) == s["masked"]).all())
        if i:  # every token committed before stays, with its value
            prev = states[i - 1]["tokens"]
            kept = prev != K
            assert torch.equal(s["tokens"][kept], prev[kept])
    assert int((tokens == K).sum()) == 0 and int(tokens.max()) < K
    assert torch.equal(tokens, states[-1]["tokens"])


def test_an_image_depends_only_on_its_seed_not_its_batch():
    net = toy_net()
    together, _ = run_sampler(net, [1, 2, 7], [101, 102, 103])
    for b, (label, seed) in enumerate([(1, 101), (2, 102), (7, 103)]):
        alone, _ = run_sampler(net, [label], [seed])
        assert torch.equal(alone[0], together[b])
    other, _ = run_sampler(net, [1], [999])
    assert not torch.equal(other[0], together[0])  # another seed, another image


def test_guidance_at_scale_one_is_the_unguided_model():
    net = toy_net()
    cond = Condition.from_labels(torch.tensor([4, 6]), 10)
    tokens = torch.randint(0, K + 1, (2, 49), generator=torch.Generator().manual_seed(0))
    plain = net(tokens, cond)
    assert torch.equal(guided_logits(net, cond, 1.0)(tokens), plain)
    # per-image scales: the row at 1 runs through the guided formula l_u + 1 (l_c - l_u) = l_c
    mixed = guided_logits(net, cond, torch.tensor([1.0, 3.0]))(tokens)
    assert torch.allclose(mixed[0], plain[0], atol=1e-5)
    null = net(tokens, cond.null())
    assert torch.allclose(mixed[1], null[1] + 3 * (plain[1] - null[1]), atol=1e-5)
    assert not torch.allclose(mixed[1], plain[1], atol=1e-3)


def test_a_sure_model_is_decoded_exactly():
    """Logits that put all their mass on token (position mod K): every sampler path returns that grid."""
    target = torch.arange(49) % K

    def logits_fn(tokens):
        return torch.nn.functional.one_hot(target, K).float().expand(tokens.shape[0], -1, -1) * 50.0

    for opts in ({}, {"temperature": 0.0, "choice_temperature": 0.0}, {"temperature": 3.0}):
        out = sample_maskgit(logits_fn, 3, 49, 12, mask_id=K, rng=ImageRNG([1, 2, 3]), **opts)
        assert torch.equal(out, target.expand(3, -1))


def test_greedy_decoding_needs_no_randomness():
    net = toy_net()
    a, _ = run_sampler(net, [2], [1], temperature=0.0, choice_temperature=0.0)
    b, _ = run_sampler(net, [2], [2], temperature=0.0, choice_temperature=0.0)
    assert torch.equal(a, b)


# ---- the network ---------------------------------------------------------------------------------


def test_network_shapes_null_class_and_config_errors():
    net = toy_net()
    tokens = torch.full((2, 49), K)
    assert net(tokens, Condition.from_labels(torch.tensor([0, 9]), 10)).shape == (2, 49, K)
    uncond = toy_net(num_classes=0)
    assert uncond(tokens, Condition.none(2)).shape == (2, 49, K)
    with pytest.raises(UsageError, match="num_heads"):
        MIMConfig(hidden_size=30, num_heads=4).validate()
    with pytest.raises(UsageError, match="unknown .* config field"):
        MIMConfig.from_dict({"patch_size": 2})
    # a fresh network is uniform over the codebook (zero-initialised head), whatever the input
    fresh = MaskedTokenTransformer(MIMConfig(codebook_size=K, depth=1, hidden_size=32, num_heads=2)).eval()
    assert torch.equal(fresh(tokens, Condition.from_labels(torch.tensor([0, 1]), 10)), torch.zeros(2, 49, K))


# ---- the masked objective and its tokenizer ----------------------------------------------------------


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory) -> Path:
    """A VQ-T/4 tokenizer with a 16-code book, trained for a few steps on 256 digits (seconds)."""
    from ditkit.tokenizer import TokenizerTrainConfig, train_tokenizer

    out = tmp_path_factory.mktemp("runs") / "vq"
    return train_tokenizer(TokenizerTrainConfig(out=str(out), codebook_size=K, max_steps=3, batch_size=32,
                                                subset=256, eval_images=0, progress=False, log_every=0))


def masked(vq_run, **kw):
    from ditkit.objectives.masked import MaskedObjective

    return MaskedObjective(tokenizer=str(vq_run), codebook_size=kw.pop("codebook_size", K), grid_size=7, **kw)


def test_masking_follows_the_cosine_ratio(vq_run):
    obj = masked(vq_run)
    r = torch.tensor([0.0, 0.5, 0.999, 1 / 3])
    scores = torch.rand(4, 49, generator=torch.Generator().manual_seed(0))
    m = obj.mask_positions(r, scores)
    assert m.sum(1).tolist() == [49, math.ceil(49 * math.cos(math.pi / 4)), 1, math.ceil(49 * math.cos(math.pi / 6))]
    # the masked positions are each row's lowest scores
    assert bool((scores[1][m[1]].max() < scores[1][~m[1]].min()))


def test_loss_is_cross_entropy_on_the_masked_tokens_only(vq_run):
    from ditkit.data import load_dataset

    obj = masked(vq_run, label_smoothing=0.0, label_dropout=0.0)
    obj.attach(None, "cpu")
    x, y = load_dataset("mnist").batch(torch.arange(8))
    cond = Condition.from_labels(y, 10)
    net = toy_net().train().requires_grad_(True)
    noise = obj.sample_noise(8, (1, 28, 28), torch.Generator().manual_seed(3))
    loss = obj.loss(net, x, cond, noise=noise)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and net.token_embed.weight.grad is not None
    # the same number by hand: codes, mask, logits, mean cross-entropy over the masked positions
    codes = obj.encode(x)
    m = obj.mask_positions(noise["r"], noise["scores"])
    logits = net(torch.where(m, torch.full_like(codes, K), codes), cond)
    ref = torch.nn.functional.cross_entropy(logits[m], codes[m])
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)


def test_sample_batch_decodes_images_and_counts_one_call_a_step(vq_run):
    from types import SimpleNamespace

    from ditkit.settings import SamplingSettings

    obj = masked(vq_run)
    obj.attach(None, "cpu")
    model = SimpleNamespace(net=toy_net(), device=torch.device("cpu"))
    cond = Condition.from_labels(torch.tensor([1, 2]), 10)
    stats, frames = {}, []
    settings = SamplingSettings(sampler="maskgit", steps=5, cfg_scale=2.0)
    x = obj.sample_batch(model, cond, [5, 6], settings, callback=frames.append, stats=stats)
    assert x.shape == (2, 1, 28, 28) and float(x.abs().max()) <= 1
    assert stats["nfe"] == 5 and [f["i"] for f in frames] == list(range(5))
    assert frames[0]["x"].shape == (2, 1, 28, 28) and frames[-1]["sigma"] == 0.0
    one = obj.sample_batch(model, cond.index([1]), [6], settings)
    assert torch.equal(one[0], x[1])  # the decoder runs image by image: batch-independent pixels too
    with pytest.raises(UsageError, match="--spacing"):
        obj.sample_batch(model, cond, [5, 6], settings.replace(spacing="karras"))
    with pytest.raises(UsageError, match="unknown option"):
        obj.sample_batch(model, cond, [5, 6], settings.replace(options={"eta": 1.0}))


def test_tokenizer_mismatches_are_clear_errors(vq_run, tmp_path):
    with pytest.raises(UsageError, match="a codebook of 16 codes, but the masked model was trained on 32"):
        masked(vq_run, codebook_size=32).attach(None, "cpu")
    not_vq = tmp_path / "dit_run"
    not_vq.mkdir()
    (not_vq / "config.json").write_text(json.dumps({"family": "dit", "model": {}, "objective": {"name": "linear"}}))
    with pytest.raises(UsageError, match="a 'dit' run, not a tokenizer"):
        masked(not_vq).attach(None, "cpu")
    with pytest.raises(DitkitError, match="not found"):
        masked(tmp_path / "nowhere").attach(None, "cpu")


# ---- end to end: the trainer, run folders, generate, the trajectory ----------------------------------------


def train_mim(vq_run, out, **kw):
    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    cfg = dict(out=str(out), model="MIM-T", tokenizer=str(vq_run), depth=1, width=32, heads=2, batch_size=16,
               max_steps=4, warmup_steps=2, log_every=2, ckpt_every=2, sample_every=0, progress=False, subset=256,
               compile=False, guide_at=0.0, sample_sampler="maskgit", sample_steps=1)  # the final grid: 1 step
    cfg.update(kw)
    return train(TrainConfig(**cfg))


@pytest.fixture(scope="module")
def mim_run(vq_run, tmp_path_factory) -> Path:
    return train_mim(vq_run, tmp_path_factory.mktemp("runs") / "mim")


def test_trained_through_the_trainer_and_sampled_by_generate(mim_run, vq_run):
    from ditkit.api import load
    from ditkit.runs import load_model, read_run_config
    from ditkit.sampling import generate

    cfg = read_run_config(mim_run, families=("mim",))
    assert cfg["objective"]["name"] == "masked" and cfg["objective"]["codebook_size"] == K
    assert cfg["model"]["codebook_size"] == K and cfg["model"]["grid_size"] == 7
    assert Path(cfg["objective"]["tokenizer"]) == vq_run.resolve()
    steps = [json.loads(line)["step"] for line in (mim_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    model = load_model(mim_run, device="cpu")
    assert model.family == "mim" and model.objective.tokenizer is not None
    out = generate(model, num=6, labels="3", seed=4, batch_size=6, steps=4, cfg_scale=2.0)  # maskgit by default
    assert out["images"].shape == (6, 28, 28, 1) and out["nfe"] == 4 and out["settings"].sampler == "maskgit"
    apart = generate(model, num=6, labels="3", seed=4, batch_size=4, steps=4, cfg_scale=2.0)
    assert (apart["images"] == out["images"]).all()  # image i depends on its seed only, not its batch
    images = load(mim_run, device="cpu").generate(labels=[3], num=2, steps=4, seed=4, cfg_scale=2.0)
    assert (images == out["images"][:2]).all()


def test_resume_continues_the_run_exactly(mim_run, vq_run, tmp_path):
    from safetensors.torch import load_file

    from ditkit.train.config import TrainConfig
    from ditkit.train.loop import train

    whole = mim_run  # 4 steps in one go
    half = train_mim(vq_run, tmp_path / "half", max_steps=2)
    cfg = TrainConfig(out=str(half), model="MIM-T", tokenizer=str(vq_run), max_steps=4, progress=False)
    train(cfg, resume=True)
    a = load_file(str(whole / "checkpoints" / "step_0000004" / "ema.safetensors"))
    b = load_file(str(half / "checkpoints" / "step_0000004" / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_trajectory_shows_the_unmasking(mim_run):
    from ditkit.runs import load_model
    from ditkit.viz.trajectory import record_trajectory

    model = load_model(mim_run, device="cpu")
    traj = record_trajectory(model, [2], [9], steps=4, cfg_scale=2.0)
    assert traj.steps == [0, 1, 2, 3] and traj.sigmas[-1] == 0.0 and traj.sigmas[0] > traj.sigmas[1]
    assert traj.x_t.shape == (4, 1, 28, 28, 1)
    # the last step has nothing masked: its state is the output
    assert (traj.x_t[-1, 0] == traj.final[0]).all()


def test_bad_input_is_one_clear_error(mim_run, vq_run, tmp_path):
    from ditkit.runs import load_model
    from ditkit.sampling import generate
    from ditkit.settings import SamplingSettings, SettingsError

    model = load_model(mim_run, device="cpu")
    with pytest.raises(SettingsError, match="--steps 0"):
        generate(model, num=1, steps=0)
    with pytest.raises(UsageError, match="--steps 50: the maskgit sampler needs 1 to 49 steps"):
        generate(model, num=1, steps=50)
    with pytest.raises(SettingsError, match="this model \\(mim\\) needs a discrete one"):
        generate(model, SamplingSettings(sampler="heun"), num=1)
    with pytest.raises(DitkitError, match="'vq' run"):  # a tokenizer where a model is expected
        load_model(vq_run, device="cpu")
    with pytest.raises(UsageError, match="a 'mim' run, not a tokenizer"):  # a model where a tokenizer is expected
        train_mim(mim_run, tmp_path / "x")
    with pytest.raises(UsageError, match="--tokenizer: for a masked image model"):
        train_mim(vq_run, tmp_path / "y", model="DiT-T/4")
    with pytest.raises(UsageError, match="give --tokenizer DIR"):
        train_mim(vq_run, tmp_path / "z", tokenizer=None)
    # a tokenizer swapped for one with another codebook: refused at load, naming both sizes
    moved = tmp_path / "mim_moved"
    import shutil
    shutil.copytree(mim_run, moved)
    cfg = json.loads((moved / "config.json").read_text())
    other = tmp_path / "vq32"
    from ditkit.tokenizer import TokenizerTrainConfig, train_tokenizer
    train_tokenizer(TokenizerTrainConfig(out=str(other), codebook_size=32, max_steps=1, batch_size=16, subset=64,
                                         eval_images=0, progress=False))
    cfg["objective"]["tokenizer"] = str(other)
    (moved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="a codebook of 32 codes, but the masked model was trained on 16"):
        load_model(moved, device="cpu")
