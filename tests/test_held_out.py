"""held_out_loss: the training objective's loss on held-out digits, on draws shared by every model."""

from __future__ import annotations

import pytest
import torch

from ditkit.condition import Condition
from ditkit.data import load_dataset
from ditkit.errors import DitkitError
from ditkit.evaluate import held_out_loss
from ditkit.sampling import load_model


@pytest.fixture(scope="module")
def test_digits():
    ds = load_dataset("mnist", "test")
    return ds.images[:96], ds.labels[:96]


@pytest.mark.parametrize("which", ["tiny_run", "tiny_ddpm_run"])
def test_held_out_loss_is_the_objectives_own_loss_on_shared_draws(which, test_digits, request):
    model = load_model(request.getfixturevalue(which))
    images, labels = test_digits
    res = held_out_loss(model, images, labels, repeats=1, bins=4, seed=7, batch_size=40)
    # the same draws by hand, through the objective's batch loss (its mean over the rows)
    from ditkit.data.dataset import to_model_range
    noise = model.objective.sample_noise(96, (1, 28, 28), torch.Generator().manual_seed(7))
    noise["drop"] = torch.zeros(96, dtype=torch.bool)
    model.net.eval()
    with torch.no_grad():
        want = model.objective.loss(model.net, to_model_range(images.float()), Condition.from_labels(labels, 10),
                                    noise=noise)
    assert res["loss"] == pytest.approx(float(want), rel=1e-5) and res["n"] == 96
    # equal-count bins of the training time, in order, whose mean is the whole's
    assert len(res["bins"]) == 4
    assert all(a["t_high"] <= b["t_low"] for a, b in zip(res["bins"], res["bins"][1:]))
    assert sum(b["loss"] for b in res["bins"]) / 4 == pytest.approx(res["loss"], rel=1e-9)
    assert res["stderr"] > 0
    # paired draws: the same seed gives the same number, another seed another
    again = held_out_loss(model, images, labels, repeats=1, bins=4, seed=7, batch_size=96)
    assert again["loss"] == pytest.approx(res["loss"], rel=1e-6)
    assert held_out_loss(model, images, labels, repeats=1, seed=8)["loss"] != pytest.approx(res["loss"], rel=1e-6)


def test_held_out_loss_refuses_bad_inputs(tiny_run, test_digits):
    model = load_model(tiny_run)
    images, labels = test_digits
    with pytest.raises(DitkitError, match=r"images of shape \(1, 14, 14\), the model's are \(1, 28, 28\)"):
        held_out_loss(model, images[:, :, :14, :14], labels)
    with pytest.raises(DitkitError, match="class-conditional; give the images' labels"):
        held_out_loss(model, images)
    with pytest.raises(DitkitError, match="must be >= 1"):
        held_out_loss(model, images, labels, repeats=0)


def test_per_row_losses_average_to_the_batch_loss(tiny_run, test_digits):
    model = load_model(tiny_run)
    images, labels = test_digits
    from ditkit.data.dataset import to_model_range
    x0, cond = to_model_range(images[:16].float()), Condition.from_labels(labels[:16], 10)
    noise = model.objective.sample_noise(16, (1, 28, 28), torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows = model.objective.loss(model.net, x0, cond, noise=noise, reduce=False)
        batch = model.objective.loss(model.net, x0, cond, noise=noise)
    assert rows.shape == (16,) and float(rows.mean()) == pytest.approx(float(batch), rel=1e-6)
