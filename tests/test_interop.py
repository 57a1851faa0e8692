"""diffusers interop: export a ditkit DiT as DiTTransformer2DModel (exact), import diffusers DiTs (with a VAE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel  # noqa: E402

from ditkit.condition import Condition  # noqa: E402
from ditkit.errors import DitkitError, UsageError  # noqa: E402
from ditkit.interop.diffusers import (EXPORT_TOLERANCE, diffusers_config, export_diffusers, from_diffusers,  # noqa: E402
                                      import_diffusers, max_difference, to_diffusers)
from ditkit.models.dit import DiT, DiTConfig  # noqa: E402
from ditkit.objectives import build_objective  # noqa: E402
from ditkit.runs import load_model, save_checkpoint  # noqa: E402
from ditkit.utils import atomic_write_json  # noqa: E402

TINY = dict(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3,
            time_freq_shift=1)


def randomised(cfg: DiTConfig, seed: int = 0) -> DiT:
    """A DiT with every weight drawn (adaLN-Zero would start it at the identity, hiding a wrong mapping)."""
    torch.manual_seed(seed)
    net = DiT(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0, 0.05 if ("adaLN" in name or "final" in name) else 0.2)
    return net.eval()


def make_run(root: Path, cfg: DiTConfig, objective: dict | None = None, seed: int = 0) -> Path:
    """A run folder as `ditkit train` leaves one: config.json and a checkpoint (EMA = model here)."""
    net = randomised(cfg, seed)
    run = root / "run"
    C, S, K = cfg.in_channels, cfg.input_size, cfg.num_classes
    atomic_write_json(run / "config.json", {
        "ditkit_version": "test", "family": "dit", "model_name": "DiT-tiny", "model": cfg.to_dict(),
        "objective": build_objective(objective or {"name": "ddpm"}).config(), "train": {"seed": 0},
        "data": {"name": "toy", "shape": [C, S, S], "num_classes": K, "class_names": [f"c{i}" for i in range(K)],
                 "num_images": 0, "class_counts": []}})
    save_checkpoint(run, 7, net, net, None, {"epoch": 0, "pos": 0, "ema_updates": 0}, {})
    return run


@pytest.mark.parametrize("parts", [dict(), dict(gelu_approximate="tanh"), dict(num_classes=0),
                                   dict(in_channels=3, patch_size=4)])
def test_export_loads_in_diffusers_and_matches(tmp_path, parts):
    cfg = DiTConfig(**{**TINY, **parts}).validate()
    run = make_run(tmp_path, cfg)
    out = tmp_path / "exported"
    res = export_diffusers(run, out)
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "ditkit.json"} <= {
        p.name for p in out.iterdir()}
    assert (out / "scheduler" / "scheduler_config.json").exists()  # ddpm: diffusers' DDPMScheduler config
    dmodel = DiTTransformer2DModel.from_pretrained(out)  # the check of the issue, done by hand here
    net = load_model(run, device="cpu").net
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.tensor([0.0, 10.5, 250.0, 700.0, 999.0])
    labels = torch.tensor([0, 1, 2, 3, 1]) if cfg.num_classes else torch.zeros(5, dtype=torch.long)
    cond = Condition.from_labels(labels, cfg.num_classes) if cfg.num_classes else Condition.none(5)
    with torch.no_grad():
        ours = net(x, t, cond)
        theirs = dmodel(x, timestep=t, class_labels=labels).sample
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max() <= EXPORT_TOLERANCE
    assert ours.abs().max() > 0.1  # the comparison means something
    assert res["max_abs_diff"] <= EXPORT_TOLERANCE
    card = (out / "README.md").read_text()
    assert "timestep" in card and "export check" in card and "DDPM step" in card


def test_mapping_round_trips_exactly():
    cfg = DiTConfig(**TINY).validate()
    net = randomised(cfg)
    back_cfg, back = from_diffusers(to_diffusers(net), diffusers_config(cfg))
    assert back_cfg == cfg
    for k, v in net.state_dict().items():
        assert torch.equal(back[k], v), k


def test_time_embedding_of_the_dit_reference_is_refused_with_its_reason(tmp_path):
    run = make_run(tmp_path, DiTConfig(**{**TINY, "time_freq_shift": 0}).validate())
    with pytest.raises(UsageError, match=r"time_freq_shift=0.*10000\^\(-i/127\)"):
        export_diffusers(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # nothing half-written


def test_unrepresentable_parts_are_named(tmp_path):
    cfg = DiTConfig(**{**TINY, "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "rope": True,
                       "pos_embed": "learned"}).validate()
    run = make_run(tmp_path, cfg)
    with pytest.raises(UsageError) as e:
        export_diffusers(run, tmp_path / "out")
    for field in ("norm='rmsnorm'", "qk_norm", "mlp='swiglu'", "rope", "pos_embed='learned'"):
        assert field in str(e.value)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_folder(tmp_path):
    run = make_run(tmp_path, DiTConfig(**TINY).validate())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        export_diffusers(run, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def diffusers_dit(in_channels: int, out_channels: int, sample_size: int, classes: int, seed: int = 0,
                  **kw) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
                              out_channels=out_channels, num_layers=2, sample_size=sample_size, patch_size=2,
                              num_embeds_ada_norm=classes, **kw)
    with torch.no_grad():  # diffusers' own init leaves adaLN-Zero at zero: draw everything
        shared = {}
        for name, p in m.named_parameters():
            key = name.split("norm1.emb.", 1)[1] if "norm1.emb." in name else None
            if key is not None and key in shared:
                p.copy_(shared[key])  # one embedder for every block, as facebook's converted DiT has
                continue
            p.normal_(0, 0.05 if ("norm1.linear" in name or "proj_out" in name) else 0.2)
            if key is not None:
                shared[key] = p.detach().clone()
    return m.eval()


def test_import_pixel_model_matches_diffusers(tmp_path):
    dm = diffusers_dit(1, 1, 8, 3, activation_fn="gelu-approximate")  # norm_eps 1e-5, diffusers' default
    dm.save_pretrained(tmp_path / "dit")
    res = import_diffusers(tmp_path / "dit", tmp_path / "run")
    assert res["max_abs_diff"] < 1e-4 and not res["latent"]
    model = load_model(tmp_path / "run", device="cpu")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["objective"]["name"] == "ddpm" and cfg["objective"]["num_timesteps"] == 1000
    assert model.net.config.time_freq_shift == 1 and model.net.config.gelu_approximate == "tanh"
    diff, scale = max_difference(model.net, dm, 999.0, seed=5)
    assert diff < 1e-4 * max(1.0, scale) and scale > 0.1


def test_import_refuses_per_block_embedders(tmp_path):
    dm = diffusers_dit(1, 1, 8, 3)
    with torch.no_grad():
        dm.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight.add_(1.0)
    dm.save_pretrained(tmp_path / "dit")
    with pytest.raises(DitkitError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder"):
        import_diffusers(tmp_path / "dit", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_bad_folders(tmp_path):
    with pytest.raises(DitkitError, match="not a diffusers model folder"):
        (tmp_path / "empty").mkdir()
        import_diffusers(tmp_path / "empty", tmp_path / "run")
    dm = diffusers_dit(1, 1, 8, 3)
    dm.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(DitkitError, match="pickled .bin"):
        import_diffusers(tmp_path / "bin", tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(DitkitError, match="UNet2DModel"):
        import_diffusers(tmp_path / "other", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def latent_pipeline(root: Path) -> Path:
    """A facebook/DiT-XL-2-256-shaped folder in miniature: transformer/ (4 latent channels, learned sigma: 8
    out), vae/ (AutoencoderKL, 2x downsampling), scheduler/ (DDPM, linear betas)."""
    pipe = root / "pipe"
    diffusers_dit(4, 8, 4, 5).save_pretrained(pipe / "transformer")
    torch.manual_seed(1)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(pipe / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(pipe / "scheduler")
    return pipe


def test_import_latent_pipeline_records_its_vae(tmp_path):
    res = import_diffusers(latent_pipeline(tmp_path), tmp_path / "run")
    assert res["latent"]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["vae"]["latent_shape"] == [4, 4, 4] and cfg["vae"]["image_shape"] == [3, 8, 8]
    assert cfg["model"]["learn_sigma"] and cfg["model"]["in_channels"] == 4
    assert cfg["objective"]["prediction"] == "eps" and cfg["import"]["objective_from"].startswith("scheduler")
    assert (tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors").exists()
    net = load_model(tmp_path / "run", device="cpu").net
    out = net(torch.randn(2, 4, 4, 4), torch.tensor([3.0, 900.0]), Condition.from_labels(torch.tensor([0, 5]), 5))
    assert out.shape == (2, 4, 4, 4)  # eps: the first 4 of the 8 channels


def test_cli_export_then_import_round_trip_samples_alike(tmp_path, capsys):
    from ditkit.cli import main
    from ditkit.sampling import generate

    run = make_run(tmp_path, DiTConfig(**TINY).validate(), objective={"name": "linear"})
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "hf")]) == 0
    assert "max |diffusers - ditkit|" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["objective"]["name"] == "linear" and back["import"]["objective_from"] == "ditkit.json"
    a, b = load_model(run, device="cpu"), load_model(tmp_path / "back", device="cpu")
    for k, v in a.net.state_dict().items():
        assert torch.equal(b.net.state_dict()[k], v), k  # the round trip moves every weight bit for bit
    ia = generate(a, num=6, labels=[0, 1, 2, 0, 1, 2], seed=11, steps=4)["images"]
    ib = generate(b, num=6, labels=[0, 1, 2, 0, 1, 2], seed=11, steps=4)["images"]
    assert np.array_equal(ia, ib)
    assert main(["export", str(make_run(tmp_path / "x", DiTConfig(**{**TINY, "rope": True}).validate())),
                 "--out", str(tmp_path / "refused")]) == 2
    assert "rope=True" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_latent_import_samples_through_its_vae(tmp_path):
    from ditkit.sampling import generate

    import_diffusers(latent_pipeline(tmp_path), tmp_path / "run")
    model = load_model(tmp_path / "run", device="cpu")
    out = generate(model, num=2, labels=[1, 4], seed=0, steps=3)
    assert out["images"].shape == (2, 8, 8, 3)  # decoded: the VAE's 3 x 8 x 8 images, not 4 x 4 x 4 latents
    again = generate(model, num=2, labels=[1, 4], seed=0, steps=3)
    assert np.array_equal(out["images"], again["images"])
