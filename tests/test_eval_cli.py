"""`ditkit eval`: on a run, on an .npz of samples, and its errors."""

import json
import shutil

import numpy as np
import pytest

from ditkit.cli import main as cli_main
from ditkit.data import load_mnist


def test_eval_samples_npz_of_real_digits(tmp_path, capsys):
    x, y = load_mnist("test")
    f = tmp_path / "real.npz"
    np.savez(f, images=x[:500, :, :, None], labels=y[:500])
    assert cli_main(["eval", "--samples", str(f), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 500 and res["class_accuracy"]["value"] > 0.98
    assert res["fid_ratio"] < 1.5  # real test digits sit at the real-data floor
    assert "not Inception" in res["note"] or "Inception" in res["note"]


def test_eval_checkpoint_writes_result_for_the_report(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # the shared fixture stays as it was for other tests
    assert cli_main(["eval", "--ckpt", str(run), "--num", "40", "--steps", "2", "--cfg-scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "class accuracy" in out and "n = 40" in out
    files = list((run / "eval").glob("*.json"))
    assert files and json.loads(files[0].read_text())["checkpoint_step"] == 40
    # autoguidance by the run's own guide: its own result file, which names the weak model
    assert cli_main(["eval", "--ckpt", str(run), "--num", "20", "--steps", "2", "--autoguidance", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["autoguidance"] == 2 and res["guide_step"] == 12 and res["n"] == 20
    assert len(list((run / "eval").glob("*_ag2_n20.json"))) == 1 and res["guide_own"] is True
    # another weak model (an early checkpoint of the same run, or another run) is named in the file, and
    # does not overwrite the result of the run's own guide
    assert cli_main(["eval", "--ckpt", str(run), "--num", "20", "--steps", "2", "--autoguidance", "2",
                     "--guide", str(run / "checkpoints" / "step_0000020"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["guide_step"] == 20 and res["guide_own"] is False
    assert len(list((run / "eval").glob("*_ag2_n20.json"))) == 1
    assert len(list((run / "eval").glob("*_ag2_guide-20_n20.json"))) == 1
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    assert cli_main(["eval", "--ckpt", str(run), "--num", "20", "--steps", "2", "--autoguidance", "2",
                     "--guide", str(other / "checkpoints" / "step_0000020"), "--json"]) == 0
    capsys.readouterr()
    assert len(list((run / "eval").glob("*_ag2_guide-other-20_n20.json"))) == 1
    # a guidance interval is a setting of its own: recorded, and named in the file
    assert cli_main(["eval", "--ckpt", str(run), "--num", "20", "--steps", "2", "--autoguidance", "2",
                     "--guidance-interval", "0.6,inf", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["guidance_interval"] == [0.6, float("inf")]
    assert len(list((run / "eval").glob("*_ag2_gi0.6-inf_n20.json"))) == 1
    # a setting that changes the images (grid, weights, seed) writes its own file, never over another's
    before = {f.name for f in (run / "eval").glob("*.json")}
    for extra in (["--spacing", "karras"], ["--weights", "model"], ["--seed", "3"]):
        assert cli_main(["eval", "--ckpt", str(run), "--num", "20", "--steps", "2", *extra]) == 0
    new = {f.name for f in (run / "eval").glob("*.json")} - before
    assert len(new) == 3 and any("_karras_" in f for f in new) and any("_raw_" in f for f in new), new
    assert json.loads((run / "eval" / next(f for f in new if "_karras_" in f)).read_text())["spacing"] == "karras"
    # the training data's class mix by default; balanced labels are their own setting
    res = json.loads((run / "eval" / next(f for f in new if "_karras_" in f)).read_text())
    assert res["labels_spec"] == "prior"
    capsys.readouterr()
    assert cli_main(["eval", "--ckpt", str(run), "--num", "20", "--steps", "2", "--labels", "all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels_spec"] == "all"
    assert len(list((run / "eval").glob("*_balanced_*n20.json"))) == 1


def test_evaluate_model_scores_the_images_it_hands_back(tiny_run):
    """The library call under `ditkit eval` and the benchmarks: the images it returns are the ones it
    scored, and the checkpoint path gives the same figures."""
    from ditkit.evaluate import evaluate_checkpoint, evaluate_model, evaluate_samples
    from ditkit.sampling import load_model

    res, samples = evaluate_model(load_model(tiny_run), num=30, steps=2, cfg_scale=1.5, seed=4)
    assert samples["images"].shape == (30, 28, 28, 1) and res["n"] == 30 and res["nfe"] == samples["nfe"]
    again = evaluate_samples(samples["images"], samples["labels"])
    assert again["fid"] == pytest.approx(res["fid"]["value"])
    assert again["class_accuracy"]["value"] == res["class_accuracy"]["value"]
    ck = evaluate_checkpoint(tiny_run, num=30, steps=2, cfg_scale=1.5, seed=4, write=False)
    assert ck["fid"]["value"] == pytest.approx(res["fid"]["value"]) and ck["precision"] == "fp32"


@pytest.mark.parametrize("argv,needle", [
    (["eval"], "exactly one of --ckpt"),
    (["eval", "--samples", "/nonexistent.npz"], "no such file"),
    (["eval", "--samples", "{bad}"], "no 'images' array"),
    (["eval", "train-classifier"], "needs --out"),
])
def test_eval_errors(argv, needle, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, pictures=np.zeros((3, 28, 28), np.uint8))
    rc = cli_main([a.format(bad=bad) for a in argv])
    err = capsys.readouterr().err
    assert rc in (1, 2) and needle in err and "Traceback" not in err
