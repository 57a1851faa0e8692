"""The house's contracts: one SamplingSettings (validated in one place, errors naming the field), one run-folder
module that reads config.json through a checked schema, the model-family registry, the CLI's shared parser,
and the Python API exactly as the README shows it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import ditkit
from ditkit.cli import main as cli_main
from ditkit.errors import DitkitError, UsageError
from ditkit.models import PRESETS, build_model, model_config, preset_family
from ditkit.runs import load_model, read_run_config, read_tuned_setting, write_tuned_setting
from ditkit.sampling import generate
from ditkit.settings import SamplingSettings, SettingsError

README = Path(__file__).resolve().parent.parent / "README.md"


# -- SamplingSettings ----------------------------------------------------------------------------
def test_settings_round_trip_through_json():
    st = SamplingSettings(sampler="dpm++2m", steps=12, cfg_scale=1.5, autoguidance=2.0,
                          guidance_interval=(0.6, float("inf")), reject=0.08, options={"s_noise": 1.0})
    d = json.loads(json.dumps(st.to_dict()))  # JSON has no inf: the open end travels as null
    assert d["guidance_interval"] == [0.6, None]
    assert SamplingSettings.from_dict(d) == st


@pytest.mark.parametrize("changes, field", [
    (dict(sampler="bogus"), "sampler"), (dict(steps=0), "steps"), (dict(steps=2.5), "steps"),
    (dict(cfg_scale=-1.0), "cfg_scale"), (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(autoguidance="2"), "autoguidance"), (dict(guidance_interval=(1.0, 0.5)), "guidance_interval"),
    (dict(reject=1.0), "reject"), (dict(reject_tries=1), "reject_tries"), (dict(cfg_schedule="wavy"), "cfg_schedule"),
])
def test_settings_errors_name_the_field(changes, field):
    with pytest.raises(SettingsError) as e:
        SamplingSettings().replace(**changes).check()
    assert e.value.field == field
    assert ("--" + field.replace("_", "-")) in str(e.value) or field in str(e.value)


def test_settings_from_a_dict_refuse_unknown_keys_and_wrong_shapes():
    with pytest.raises(UsageError, match="unknown sampling setting"):
        SamplingSettings.from_dict({"sampler": "ddim", "stepz": 3})
    with pytest.raises(UsageError, match="JSON object"):
        SamplingSettings.from_dict(["ddim"])
    with pytest.raises(SettingsError) as e:
        SamplingSettings.from_dict({"guidance_interval": [1]})
    assert e.value.field == "guidance_interval"


def test_settings_checked_against_the_model(tiny_run):
    m = load_model(tiny_run)
    with pytest.raises(SettingsError) as e:
        SamplingSettings(sampler="heun", options={"eta": 0.5}).validate(m)
    assert e.value.field == "options" and "s_churn" in str(e.value)
    with pytest.raises(SettingsError) as e:
        SamplingSettings(spacing="nowhere").validate(m)
    assert e.value.field == "spacing"
    assert SamplingSettings(sampler="euler", steps=3).validate(m).steps == 3


def test_generate_takes_the_settings_object_or_keywords_alike(tiny_run):
    m = load_model(tiny_run)
    st = SamplingSettings(sampler="dpm++2m", steps=3, cfg_scale=1.5)
    a = generate(m, st, num=3, labels="all", seed=5)
    b = generate(m, num=3, labels="all", seed=5, sampler="dpm++2m", steps=3, cfg_scale=1.5)
    assert np.array_equal(a["images"], b["images"]) and a["settings"] == st


# -- run folders ---------------------------------------------------------------------------------
def _broken_copy(tiny_run: Path, tmp_path: Path, edit) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(edit(cfg)))
    return run


@pytest.mark.parametrize("edit, words", [
    (lambda c: [c], "JSON object"),
    (lambda c: {**c, "model": "DiT-T/4"}, "'model' must be a JSON object"),
    (lambda c: {**c, "model": [1, 2]}, "'model' must be a JSON object"),
    (lambda c: {**c, "model": {**c["model"], "depth": "four"}}, "model.depth: must be an integer"),
    (lambda c: {**c, "model": {**c["model"], "widht": 3}}, "unknown keys ['widht']"),
    (lambda c: {**c, "family": "gan"}, "model family 'gan'"),
    (lambda c: {k: v for k, v in c.items() if k != "objective"}, "missing 'objective'"),
])
def test_a_broken_config_is_one_clear_error_naming_the_field(tiny_run, tmp_path, capsys, edit, words):
    run = _broken_copy(tiny_run, tmp_path, edit)
    with pytest.raises(DitkitError, match=re.escape(words)):
        read_run_config(run)
    rc = cli_main(["sample", "--ckpt", str(run), "--out", str(tmp_path / "x.png"), "--num", "1", "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and words in err and "Traceback" not in err


def test_a_tuned_setting_is_read_back_and_a_corrupt_one_is_named(tiny_run, tmp_path):
    run = _broken_copy(tiny_run, tmp_path, lambda c: c)
    assert read_tuned_setting(run) is None
    st = SamplingSettings(sampler="dpm++2m", steps=4, cfg_scale=1.2)
    write_tuned_setting(run, {"settings": st.to_dict(), "figures": {}})
    assert read_tuned_setting(run) == st
    (run / "sampling.json").write_text(json.dumps({"settings": {"steps": "many"}}))
    with pytest.raises(DitkitError, match="sampling.json.*--steps many"):
        read_tuned_setting(run)
    (run / "sampling.json").write_text("{not json")
    with pytest.raises(DitkitError, match="unreadable"):
        read_tuned_setting(run)


def test_sample_uses_the_tuned_setting_unless_a_flag_or_plain_says_otherwise(tiny_run, tmp_path, capsys):
    run = _broken_copy(tiny_run, tmp_path, lambda c: c)
    write_tuned_setting(run, {"settings": SamplingSettings(sampler="dpm++2m", steps=3).to_dict()})
    base = ["sample", "--ckpt", str(run), "--num", "2"]
    assert cli_main(base + ["--out", str(tmp_path / "a.png")]) == 0
    assert "dpm++2m, 3 steps" in capsys.readouterr().out
    assert cli_main(base + ["--out", str(tmp_path / "b.png"), "--steps", "2"]) == 0
    assert "dpm++2m, 2 steps" in capsys.readouterr().out
    assert cli_main(base + ["--out", str(tmp_path / "c.png"), "--setting", "plain", "--steps", "2"]) == 0
    assert "dpm++2m-sde, 2 steps" in capsys.readouterr().out


# -- families and the CLI's parser ---------------------------------------------------------------
def test_every_preset_builds_through_its_family():
    for name in ("DiT-T/4", "DiT-T/7"):
        assert preset_family(name) == "dit"
        assert build_model(model_config(name)).config.patch_size == int(name.split("/")[1])
    with pytest.raises(UsageError, match="unknown model"):
        preset_family("DiT-Z/9")
    assert "DiT-XL/2" in PRESETS


def test_a_mistyped_flag_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["sample", "--ckpt", "x", "--out", "y.png", "--cfg-scal", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    first = err.splitlines()[0]
    assert "unrecognized arguments: --cfg-scal" in first and "did you mean --cfg-scale" in first
    assert len(err.splitlines()) <= 2


def test_eval_warns_that_fid_means_nothing_at_tiny_n(tiny_run, tmp_path, capsys):
    run = _broken_copy(tiny_run, tmp_path, lambda c: c)  # eval writes RUN/eval/: keep the shared run as it is
    assert cli_main(["eval", "--ckpt", str(run), "--num", "20", "--steps", "2", "--batch-size", "20"]) == 0
    assert "warning: FID of only 20 images" in capsys.readouterr().err


def test_eval_never_suggests_unpickling(tmp_path, capsys):
    import pickle

    bad = tmp_path / "s.npz"
    bad.write_text("not an archive")
    assert cli_main(["eval", "--samples", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "not an .npz archive" in err and "allow_pickle" not in err
    obj = tmp_path / "o.npz"
    np.savez(obj, images=np.array([{"a": 1}], dtype=object))
    assert cli_main(["eval", "--samples", str(obj)]) == 1
    err = capsys.readouterr().err
    assert "never unpickles" in err and "allow_pickle" not in err and "pickle.load" not in err
    del pickle


# -- the Python API, as the README shows it ----------------------------------------------------------
def test_python_api(tiny_run):
    m = ditkit.load(tiny_run)
    images = m.generate(labels=[3, 7], steps=3, seed=0)
    assert images.shape == (2, 28, 28, 1) and images.dtype == np.uint8
    again = m.generate(labels=[3, 7], steps=3, seed=0)
    assert np.array_equal(images, again)
    pics = m.generate(labels=[1], steps=2, as_pil=True)
    assert pics[0].size == (28, 28)
    with pytest.raises(UsageError, match="unknown sampling setting"):
        m.generate(labels=[1], stepz=2)


def test_the_readme_python_block_runs_as_written(tiny_run, monkeypatch, tmp_path):
    text = README.read_text()
    m = re.search(r"^## Python API\s*$.*?^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert m, "README.md needs a ```python block under '## Python API'"
    code = m.group(1)
    runs = set(re.findall(r"""ditkit\.load\(\s*["']([^"']+)["']""", code))
    assert runs, "the README's block loads a run with ditkit.load(\"...\")"
    for r in runs:  # the README's run folder, stood in for by the tests' small trained run
        dest = tmp_path / r
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tiny_run, dest)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


# -- the run's own sampling setting and its guide ---------------------------------------------------
def test_tune_rule_is_accuracy_first_then_fid_then_cost():
    from ditkit.tune import Measured, choose, plan_images

    st = SamplingSettings()
    m = [Measured("a", st, 0.30, fid_ratio=1.00, accuracy=0.995),   # best FID, costly
         Measured("b", st, 0.05, fid_ratio=1.04, accuracy=0.993),   # within 5% of it, cheaper: wins
         Measured("c", st, 0.01, fid_ratio=0.90, accuracy=0.950)]   # best FID of all, reads wrong too often
    assert choose(m).name == "b"
    m[1].fid_ratio = 1.2
    assert choose(m).name == "a"
    n, kept = plan_images({"cheap": 0.01, "dear": 1.0}, budget_s=60, probe_s=0)
    assert kept == ["cheap"] and n >= 200  # the costliest candidate goes first when the budget is short
    n, kept = plan_images({"x": 0.001, "y": 0.002}, budget_s=600, probe_s=0)
    assert n == 1000 and kept == ["x", "y"]


def test_tune_refuses_runs_its_judge_cannot_read():
    from ditkit.tune import not_judged

    digits = [str(i) for i in range(10)]
    assert not_judged({"data": {"name": "mnist-train", "shape": [1, 28, 28], "class_names": digits}}) is None
    letters = {"data": {"name": "glyphs", "shape": [1, 28, 28], "class_names": list("ABCDEFGHIJ")}}
    assert "'glyphs'" in not_judged(letters)  # 28x28 like MNIST, but not digits: the judge would misread it
    assert "[3, 32, 32]" in not_judged({"data": {"name": "mnist-train", "shape": [3, 32, 32]}})


def test_the_guide_ladder_keeps_the_snapshot_nearest_its_fraction_of_the_steps():
    import torch

    from ditkit.train.guide import GuideLadder

    net = torch.nn.Linear(2, 2)
    ladder = GuideLadder(0.3, max_snapshots=4)
    for step in range(1, 101):
        with torch.no_grad():
            net.weight.fill_(step)
        ladder.observe(step, net)
    assert len(ladder.snapshots) <= 4 + 1 and ladder.interval >= 25
    step, w = ladder.choose(100)
    assert abs(step - 30) <= ladder.interval / 2 + 1 and float(w["weight"][0, 0]) == step
    assert GuideLadder(0.3, kept_step=30).choose(100) is None  # nothing nearer than the guide on disk


def test_the_server_defaults_to_the_runs_tuned_setting(tiny_run, tmp_path):
    import asyncio

    import httpx

    from ditkit.serve import ServeSettings, create_app

    run = _broken_copy(tiny_run, tmp_path, lambda c: c)
    write_tuned_setting(run, {"settings": SamplingSettings(sampler="dpm++2m", steps=3, cfg_scale=1.5,
                                                           guidance_interval=(0.5, float("inf"))).to_dict()})
    model = load_model(run)

    async def main():
        app = create_app(model=model, settings=ServeSettings(rate_limit=0.0, timeout_s=30.0, grace_s=5.0))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                for _ in range(200):
                    if app.state.service.state == "ready":
                        break
                    await asyncio.sleep(0.05)
                info = (await c.get("/v1/model")).json()
                assert info["default_sampler"] == "dpm++2m" and info["default_steps"] == 3
                body = (await c.get("/openapi.json")).json()["components"]["schemas"]["GenerateRequest"]
                assert body["properties"]["guidance_scale"]["default"] == 1.5
                r = await c.post("/v1/generate", json={"labels": [3], "seed": 4, "format": "json"})
                assert r.status_code == 200, r.text
                got = r.json()
                assert got["sampler"] == "dpm++2m" and got["steps"] == 3
    asyncio.run(main())
