"""The optimisers: Muon against torch's reference implementation, its pairing with AdamW, and a Muon run's
checkpoint and bit-exact resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ditkit.errors import UsageError
from ditkit.models import build_model, model_config
from ditkit.runs import latest_checkpoint, load_weights
from ditkit.train.config import TrainConfig
from ditkit.train.loop import train
from ditkit.train.optim import (DEFAULT_WEIGHT_DECAY, Muon, MuonAdamW, build_optimizer, muon_parameters,
                                zeropower_newton_schulz)

from test_train import SMALL, losses, trained_and_resumed_alike

SHAPES = [(384, 128), (128, 128), (512, 128), (128, 512), (96, 40)]  # DiT-T/4's, tall and wide, and an odd one


def test_newton_schulz_is_the_reference_iteration_and_nearly_orthogonalises():
    from torch.optim._muon import _zeropower_via_newtonschulz
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        k = min(shape)
        # a spectrum spread over 20x (Gaussian matrices have near-zero singular values, which 5 steps
        # cannot lift, by design): U diag(s) V^T
        u = torch.linalg.qr(torch.randn(3, shape[0], k, generator=g))[0]
        v = torch.linalg.qr(torch.randn(3, shape[1], k, generator=g))[0]
        s = torch.exp(torch.empty(3, k).uniform_(-3.0, 0.0, generator=g))
        m = u @ torch.diag_embed(s) @ v.mT
        wide = m if shape[0] <= shape[1] else m.mT
        ours = zeropower_newton_schulz(wide)
        ours = ours if shape[0] <= shape[1] else ours.mT
        for i in range(3):
            ref = _zeropower_via_newtonschulz(m[i], (3.4445, -4.7750, 2.0315), 5, 1e-7)
            torch.testing.assert_close(ours[i].float(), ref.float(), atol=2e-2, rtol=2e-2)
        # the quintic brings every singular value near 1 (into ~[0.7, 1.2]), with the same singular vectors
        sv = torch.linalg.svdvals(ours.float())
        assert sv.min() > 0.6 and sv.max() < 1.3, (shape, sv.min(), sv.max())
        assert torch.allclose(ours.float() @ v, u @ torch.diag_embed(torch.diagonal(u.mT @ ours.float() @ v, 0, -2, -1)),
                              atol=0.05)
    with pytest.raises(ValueError, match="wide matrices"):
        zeropower_newton_schulz(torch.randn(1, 5, 3))


def test_muon_steps_match_torch_muon():
    """Muon here (the matrices of one shape orthogonalised together) takes the same steps as
    torch.optim.Muon with Moonshot's AdamW-matched lr, momentum and weight decay included."""
    g = torch.Generator().manual_seed(1)
    ours = [torch.randn(*s, generator=g).requires_grad_() for s in SHAPES + SHAPES[:2]]  # shapes repeat
    ref = [p.detach().clone().requires_grad_() for p in ours]
    o1 = Muon(ours, lr=3e-3, weight_decay=0.05)
    o2 = torch.optim.Muon(ref, lr=3e-3, weight_decay=0.05, adjust_lr_fn="match_rms_adamw")
    for _ in range(4):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.zeros(3, requires_grad=True)])


def _model():
    torch.manual_seed(0)
    return build_model(model_config("DiT-T/4", depth=2, hidden_size=32, num_heads=2))


def test_muon_takes_the_blocks_hidden_matrices_and_adamw_the_rest():
    model = _model()
    names = muon_parameters(model)
    assert names and all(n.startswith("blocks.") for n in names)
    assert {n.split(".", 2)[2] for n in names} == {"attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight",
                                                  "mlp.fc2.weight"}
    opt = build_optimizer(model, "muon", lr=1e-3, beta2=0.99, weight_decay=0.0, device=torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    on_muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    on_adam = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert not on_muon & on_adam and len(on_muon | on_adam) == len(list(model.parameters()))
    for g in opt.param_groups:  # the loop sets the lr of every group, both optimisers'
        g["lr"] = 5e-4
    assert opt.adamw.param_groups[0]["lr"] == opt.muon.param_groups[0]["lr"] == 5e-4
    with pytest.raises(UsageError, match="--optimizer 'sgd'"):
        build_optimizer(model, "sgd", lr=1e-3, beta2=0.99, weight_decay=0.0, device=torch.device("cpu"))


def test_muon_adamw_state_round_trip():
    def steps(model, opt, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    cpu = torch.device("cpu")
    a = _model()
    oa = build_optimizer(a, "muon", lr=1e-3, beta2=0.99, weight_decay=0.0, device=cpu)
    steps(a, oa, 3, 0)
    sd = copy.deepcopy(oa.state_dict())  # as a checkpoint holds it: not the live tensors
    assert json.dumps(sd["param_groups"])  # a checkpoint's state.json holds the groups
    b = _model()
    b.load_state_dict(a.state_dict())
    ob = build_optimizer(b, "muon", lr=1e-3, beta2=0.99, weight_decay=0.0, device=cpu)
    ob.load_state_dict(sd)
    steps(a, oa, 2, 1)
    steps(b, ob, 2, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    adam_only = build_optimizer(_model(), "adamw", lr=1e-3, beta2=0.99, weight_decay=0.0, device=cpu)
    with pytest.raises(UsageError, match="AdamW state"):
        ob.load_state_dict(adam_only.state_dict())


def test_a_muon_run_records_its_optimizer_and_resumes_bit_exactly(tmp_path):
    kw = dict(SMALL, ckpt_every=0, lr_decay=0.0, optimizer="muon")
    full = trained_and_resumed_alike(tmp_path, kw, steps=10, stop=4)
    recorded = json.loads((full / "config.json").read_text())["train"]
    assert (recorded["optimizer"], recorded["weight_decay"]) == ("muon", 0.1)  # --weight-decay auto, written down
    a, b = load_weights(latest_checkpoint(full), "ema"), load_weights(latest_checkpoint(tmp_path / "part"), "ema")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an AdamW run differs (Muon did train the matrices), and a resume may not switch optimiser (a flag left
    # at its default takes the run's value: only a flag that differs from the default can ask for a switch)
    adam = train(TrainConfig(out=str(tmp_path / "adam"), max_steps=4, **dict(kw, optimizer="adamw")))
    assert losses(adam)[-1] != losses(tmp_path / "part")[3]
    with pytest.raises(UsageError, match="optimizer"):
        train(TrainConfig(out=str(tmp_path / "part"), max_steps=6, **dict(kw, optimizer="adamw")), resume=True)


def test_bad_optimizer_is_refused():
    with pytest.raises(UsageError, match="--optimizer 'sgd': allowed adamw, muon"):
        TrainConfig(optimizer="sgd").validate()


def test_muon_is_the_default_and_a_run_from_before_the_option_resumes_with_adamw(tmp_path):
    assert TrainConfig().optimizer == "muon"
    kw = dict(SMALL, ckpt_every=0, lr_decay=0.0)
    default = train(TrainConfig(out=str(tmp_path / "default"), max_steps=2, **kw))
    recorded = json.loads((default / "config.json").read_text())["train"]
    assert (recorded["optimizer"], recorded["weight_decay"]) == ("muon", 0.1)
    # a run written before --optimizer existed (no "optimizer" in its config.json) trained with AdamW,
    # and resumes with it under the default flags, bit-exactly
    full = train(TrainConfig(out=str(tmp_path / "full"), max_steps=4, optimizer="adamw", **kw))
    assert json.loads((full / "config.json").read_text())["train"]["weight_decay"] == 0.0
    old = tmp_path / "old"
    train(TrainConfig(out=str(old), max_steps=2, optimizer="adamw", **kw))
    config = json.loads((old / "config.json").read_text())
    del config["train"]["optimizer"]
    (old / "config.json").write_text(json.dumps(config))
    train(TrainConfig(out=str(old), max_steps=4, progress=False), resume=True)
    assert losses(old) == losses(full)


def test_weight_decay_auto_follows_the_optimizer_and_a_recorded_one_is_kept_on_resume():
    cpu = torch.device("cpu")
    opt = build_optimizer(_model(), "muon", lr=1e-3, beta2=0.99, weight_decay=DEFAULT_WEIGHT_DECAY["muon"],
                          device=cpu)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1]  # AdamW's group and Muon's
    assert DEFAULT_WEIGHT_DECAY == {"adamw": 0.0, "muon": 0.1}
    assert TrainConfig().weight_decay is None
    # a Muon run from before auto recorded 0.0: resuming it with the default keeps 0.0, an explicit value wins
    recorded = TrainConfig.recorded(dict(TrainConfig(optimizer="muon", weight_decay=0.0).to_dict()))
    assert TrainConfig().settings_of_run(recorded).weight_decay == 0.0
    assert TrainConfig(weight_decay=0.05).settings_of_run(recorded).weight_decay == 0.05
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="--weight-decay .*: must be a number >= 0"):
            TrainConfig(weight_decay=bad).validate()
