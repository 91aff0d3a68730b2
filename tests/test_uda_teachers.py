"""minikd.adaptation: the UDA methods that train notebook 05's teachers, against hand-made
examples and direct transcriptions of the papers' definitions."""

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from minikd import adaptation, models, training
from minikd.data import ToyCity, Unlabelled
from minikd.fusion import PseudoLabels


# --------------------------------------------------------------------------- CBST
def test_class_balanced_thresholds_keep_the_same_share_of_every_class():
    # class 0: confidences .9 .8 .7 .6 ; class 1: .5 .4 ; one pixel of class 2 at .3
    conf = torch.tensor([[[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.95]]])
    pred = torch.tensor([[[0, 0, 0, 0], [1, 1, 2, 1]]])
    labels, k = adaptation.class_balanced_pseudo_labels(conf, pred, portion=0.5)
    # by hand: class 0 keeps its top 2 of 4 (k=.8), class 1 its top 2 of 3 (ceil(1.5), k=.5),
    # class 2 its only pixel (k=.3). A global threshold at .5 would drop class 2 entirely.
    assert torch.allclose(k, torch.tensor([0.8, 0.5, 0.3]))
    assert labels.dtype == torch.uint8
    assert labels.tolist() == [[[0, 0, 255, 255], [1, 255, 2, 1]]]


def test_class_balanced_pseudo_labels_portion_one_keeps_all_and_valid_drops_padding():
    conf = torch.rand(2, 3, 5)
    pred = torch.randint(0, 4, (2, 3, 5))
    labels, _ = adaptation.class_balanced_pseudo_labels(conf, pred, portion=1.0)
    assert torch.equal(labels.long(), pred)
    valid = torch.ones(2, 3, 5, dtype=torch.bool)
    valid[:, -1] = False
    labels, _ = adaptation.class_balanced_pseudo_labels(conf, pred, 1.0, valid=valid)
    assert (labels[:, -1] == 255).all() and torch.equal(labels[:, :-1].long(), pred[:, :-1])
    with pytest.raises(ValueError, match="portion=0"):
        adaptation.class_balanced_pseudo_labels(conf, pred, 0)
    with pytest.raises(ValueError, match="differ"):
        adaptation.class_balanced_pseudo_labels(conf, pred[:1])


# --------------------------------------------------------------------------- ClassMix
def test_class_mix_pastes_half_the_source_classes_with_their_labels():
    g = torch.Generator().manual_seed(0)
    src_mask = torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 255]]])
    src = torch.full((1, 3, 2, 4), 1.0)
    tgt = torch.zeros(1, 3, 2, 4)
    tgt_labels = torch.full((1, 2, 4), 7)
    image, labels, mix = adaptation.class_mix(src, src_mask, tgt, tgt_labels, generator=g)
    pasted = src_mask[0][mix[0]].unique().tolist()
    assert len(pasted) == 2 and 255 not in pasted  # half of the 4 classes, never void
    assert torch.equal(mix[0], torch.isin(src_mask[0], torch.tensor(pasted)))
    assert torch.equal(image[:, 0] == 1, mix) and torch.equal(image[:, 0] == 0, ~mix)
    assert torch.equal(labels[mix], src_mask[mix]) and (labels[~mix] == 7).all()


# --------------------------------------------------------------------------- AdaBN
def test_adabn_sets_the_exact_target_statistics_and_keeps_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    target = [torch.randn(4, 3, 5, 5) * 3 + 2 for _ in range(3)]
    adaptation.adabn(model, target)
    assert not model.training
    feats = torch.cat([model[0](x) for x in target]).detach()
    # the cumulative average of equal-size batch means is the overall mean; variances are the
    # batches' unbiased ones, averaged
    assert torch.allclose(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    var = torch.stack([model[0](x).detach().var((0, 2, 3), unbiased=True) for x in target])
    assert torch.allclose(model[1].running_var, var.mean(0), atol=1e-4)
    assert model[1].momentum == 0.1  # restored
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(ValueError, match="no BatchNorm"):
        adaptation.adabn(nn.Conv2d(3, 3, 1), target)
    with pytest.raises(ValueError, match="no target images"):
        adaptation.adabn(model, [])


# --------------------------------------------------------------------------- entropy
def test_entropy_map_is_the_normalised_categorical_entropy():
    logits = torch.randn(2, 5, 3, 4) * 3
    want = torch.distributions.Categorical(logits=logits.movedim(1, -1)).entropy() / math.log(5)
    assert torch.allclose(adaptation.entropy_map(logits), want, atol=1e-6)
    assert adaptation.entropy_map(torch.zeros(1, 5, 2, 2)).allclose(torch.ones(1, 2, 2))


# --------------------------------------------------------------------------- data and loss
def _target(n=4):
    return ToyCity(n, (16, 32), domain="target", split="train")


def test_source_target_refuses_labelled_target_data():
    src = ToyCity(4, (16, 32))
    with pytest.raises(TypeError, match="never trains on target labels"):
        adaptation.SourceTarget(src, _target())
    item = adaptation.SourceTarget(src, Unlabelled(_target()))[0]
    assert {"image", "mask", "target_image", "target_mask", "target_valid"} <= set(item)
    assert (item["target_mask"] == 255).all()
    labels = torch.randint(0, 17, (4, 16, 32), dtype=torch.uint8)
    item = adaptation.SourceTarget(src, PseudoLabels(_target(), labels))[1]
    assert any(torch.equal(item["target_mask"], lab.long()) for lab in labels)


@pytest.mark.parametrize("method", adaptation.UDA_METHODS)
def test_uda_loss_trains_the_model_from_both_domains(method):
    torch.manual_seed(0)
    model = models.unet_family("M128/4", ToyCity.NUM_CLASSES)
    labels = torch.randint(0, 17, (4, 16, 32), dtype=torch.uint8)
    target = (PseudoLabels(_target(), labels) if method == "self_training"
              else Unlabelled(_target()))
    batch = next(iter(DataLoader(adaptation.SourceTarget(ToyCity(4, (16, 32)), target),
                                 batch_size=4)))
    loss_fn = adaptation.UDALoss(model, method, weight=0.5)
    loss, terms = loss_fn(model(batch["image"]), batch)
    assert torch.isfinite(loss) and set(terms) == {"ce", method}
    assert loss.item() == pytest.approx(terms["ce"].item() + 0.5 * terms[method].item(), rel=1e-5)
    # the target term alone reaches the weights: the source outputs are detached here
    model.zero_grad()
    loss, _ = adaptation.UDALoss(model, method)(model(batch["image"]).detach(), batch)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_uda_loss_bad_input():
    model = models.unet_family("M128/4", ToyCity.NUM_CLASSES)
    with pytest.raises(ValueError, match="'adversarial' is not known"):
        adaptation.UDALoss(model, "adversarial")
    with pytest.raises(ValueError, match="weight=-1"):
        adaptation.UDALoss(model, "entropy_min", -1)
    with pytest.raises(KeyError, match="SourceTarget"):
        adaptation.UDALoss(model, "entropy_min")(torch.zeros(1, 17, 4, 4),
                                                 {"mask": torch.zeros(1, 4, 4).long()})
    batch = {"image": torch.rand(1, 3, 16, 32), "mask": torch.zeros(1, 16, 32).long(),
             "target_image": torch.rand(1, 3, 16, 32),
             "target_mask": torch.full((1, 16, 32), 40), "target_valid": torch.ones(1, 16, 32).bool()}
    with pytest.raises(ValueError, match="target pseudo-labels contain"):
        adaptation.UDALoss(model, "self_training")(model(batch["image"]), batch)


def test_mean_teacher_is_an_exponential_moving_average():
    student = nn.Linear(2, 2)
    teacher = adaptation.MeanTeacher(student, alpha=0.9)
    before = teacher.ema.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update()
    assert torch.allclose(teacher.ema.weight, 0.9 * before + 0.1 * student.weight)
    assert not any(p.requires_grad for p in teacher.ema.parameters())
    with pytest.raises(ValueError, match="alpha=1"):
        adaptation.MeanTeacher(student, 1)


def test_strong_photometric_changes_the_image_only():
    sample = ToyCity(1, (16, 32))[0]
    g = torch.Generator().manual_seed(0)
    out = adaptation.strong_photometric()(sample, generator=g)
    assert not torch.equal(out["image"], sample["image"])
    assert 0 <= out["image"].min() and out["image"].max() <= 1
    assert torch.equal(out["mask"], sample["mask"]) and torch.equal(out["depth"], sample["depth"])
    with pytest.raises(ValueError, match="max_sigma=-1"):
        adaptation.RandomBlurNoise(-1)


# --------------------------------------------------------------------------- zoo recipes
@pytest.mark.parametrize("name", [n for n, e in models.zoo_manifest()["entries"].items()
                                  if e["recipe"].get("method")])
def test_each_uda_recipe_runs_a_few_steps(name, tmp_path):
    """Every UDA zoo recipe, shrunk to 3 steps on 8 images: it trains and is measured on the
    target domain (its entry's validation set)."""
    manifest = copy.deepcopy(models.zoo_manifest())
    entry = manifest["entries"][name]
    r = entry["recipe"]
    r["data"]["n"] = r["target"]["n"] = 8
    r["curve_n"] = 4
    if r["iterations"]:
        r.update(iterations=3, val_every=3)
    manifest["validation"].update(n=4, check_n=4)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    _, fields = training.train_zoo_entry(name, tmp_path / "work", manifest_path=path,
                                             progress=False)
    assert training.zoo_validation_spec(manifest, entry)["domain"] == "target"
    assert 0 <= fields["val"]["miou"] <= 1
    assert len(fields["curve"]) == (1 if r["iterations"] else 0)


# --------------------------------------------------------------------------- full-mode teachers
def test_load_teachers_reads_the_documented_layout(tmp_path):
    torch.manual_seed(0)
    a, b = models.unet_family("M128/4", 5), models.unet_family("M128/4", 5)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save({"model": b.state_dict(), "step": 3}, tmp_path / "b.pt")  # a fit checkpoint
    spec = {"teachers": {n: {"builder": "unet_family", "args": {"name": "M128/4", "num_classes": 5},
                             "file": f} for n, f in (("A", "a.pt"), ("B", "b.pt"))}}
    (tmp_path / models.TEACHERS_FILE).write_text(json.dumps(spec))
    loaded = models.load_teachers(tmp_path)
    assert list(loaded) == ["A", "B"] and not loaded["A"].training
    x = torch.rand(1, 3, 16, 32)
    assert torch.equal(loaded["B"](x), b.eval()(x))
    spec["teachers"]["B"]["args"]["num_classes"] = 7
    (tmp_path / models.TEACHERS_FILE).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="teacher 'B'.*does not fit"):
        models.load_teachers(tmp_path)
    (tmp_path / "b.pt").unlink()
    with pytest.raises(FileNotFoundError, match="teacher 'B'.*missing"):
        models.load_teachers(tmp_path)
    with pytest.raises(FileNotFoundError, match="teachers.json"):
        models.load_teachers(tmp_path / "nowhere")


def test_resize_moves_every_per_pixel_map_to_the_size():
    from minikd.data import Resize

    sample = ToyCity(1, (16, 32))[0]
    out = Resize((8, 12))(sample)
    assert out["image"].shape == (3, 8, 12) and out["mask"].shape == (8, 12)
    assert out["mask"].dtype == sample["mask"].dtype
    assert set(out["mask"].unique().tolist()) <= set(sample["mask"].unique().tolist())
    with pytest.raises(ValueError, match="positive"):
        Resize((0, 3))
