"""Tests for the library half of EMUFormer (issue 11): teacher-side colour jitter in the teacher
cache, the Eq. 7 / GNLL / MSE / Huber loss objects, evaluate's segmentation-uncertainty choice and
depth uncertainty metrics, MC dropout reaching the MiT encoder, and the depth sparsification
curve / AUSE. Every number is checked against a direct transcription of the paper's equation or
a hand count on a tiny map."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minikd import ensembles, losses, metrics, models, training
from minikd.data import ColorJitter, train_transforms

torch.set_num_threads(1)
B, C, H, W = 2, 3, 3, 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _depth_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    target = torch.rand(B, H, W, generator=g) * 3 + 0.5
    target[0, 0, :2] = 0.0  # invalid ground truth
    target[1, 2, 3] = -1.0  # also invalid (<= 0)
    return {"depth": target, "mask": torch.randint(0, C, (B, H, W), generator=g)}


def _student(seed: int = 1) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {"logits": torch.randn(B, C, H, W, generator=g, requires_grad=True),
            "depth": (torch.rand(B, H, W, generator=g) * 4).requires_grad_(),
            "depth_var": (torch.rand(B, H, W, generator=g) + 0.1).requires_grad_()}


# --------------------------------------------------------------------------- 2. losses
def _eq6(mu, var, y):
    """EMUFormer Eq. 6 over valid pixels: mean of 0.5·((y − μ)²/s² + log s²)."""
    v = y > 0
    return (0.5 * ((y[v] - mu[v]) ** 2 / var[v] + var[v].log())).mean()


def _huber(mu, y, delta):
    v = y > 0
    d = (mu[v] - y[v]).abs()
    return torch.where(d < delta, 0.5 * d**2, delta * (d - 0.5 * delta)).mean()


def test_depth_regression_loss_matches_the_equations():
    out, batch = _student(), _depth_batch()
    mu, var, y = out["depth"].detach(), out["depth_var"].detach(), batch["depth"]
    v = y > 0
    assert losses.depth_regression_loss(mu, var, y).item() == pytest.approx(
        _eq6(mu, var, y).item(), rel=1e-6)
    assert losses.depth_regression_loss(mu, None, y, "mse").item() == pytest.approx(
        ((mu[v] - y[v]) ** 2).mean().item(), rel=1e-6)
    d = (mu[v] - y[v]).abs()
    assert bool((d < 0.5).any()) and bool((d > 0.5).any())  # both Huber branches are used
    assert losses.depth_regression_loss(mu, var, y, "huber", huber_delta=0.5).item() == \
        pytest.approx(_huber(mu, y, 0.5).item(), rel=1e-6)
    nothing = torch.zeros_like(y)
    for kind in losses.DEPTH_LOSSES:
        assert losses.depth_regression_loss(mu, var, nothing, kind).item() == 0.0
    with pytest.raises(ValueError, match=r"depth_loss='l1'; expected one of \['gnll', 'mse'"):
        losses.depth_regression_loss(mu, var, y, "l1")
    with pytest.raises(ValueError, match="needs the predicted variance"):
        losses.depth_regression_loss(mu, None, y, "gnll")


def test_seg_depth_loss_is_eq7():
    out, batch = _student(), _depth_batch()
    loss, terms = losses.SegDepthLoss(w1=0.5)(out, batch)
    ce = F.cross_entropy(out["logits"], batch["mask"])
    gnll = _eq6(out["depth"], out["depth_var"], batch["depth"])
    assert set(terms) == {"ce", "gnll"}
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert terms["gnll"].item() == pytest.approx(gnll.item(), rel=1e-6)
    assert loss.item() == pytest.approx((ce + 0.5 * gnll).item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["mse", "huber"])
def test_mean_only_depth_losses_leave_the_variance_untrained(kind):
    out, batch = _student(), _depth_batch()
    loss, terms = losses.SegDepthLoss(depth_loss=kind)(out, batch)
    assert set(terms) == {"ce", kind}
    y = batch["depth"]
    ref = _huber(out["depth"], y, 1.0) if kind == "huber" else \
        ((out["depth"] - y)[y > 0] ** 2).mean()
    assert terms[kind].item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert out["depth_var"].grad is None and out["depth"].grad is not None


def test_depth_gnll_loss_object_for_a_depthformer():
    out, batch = _student(), _depth_batch()
    out = {k: out[k] for k in ("depth", "depth_var")}
    loss, terms = losses.DepthGNLLLoss()(out, {"depth": batch["depth"]})
    assert set(terms) == {"gnll"}
    assert loss.item() == pytest.approx(_eq6(out["depth"], out["depth_var"],
                                             batch["depth"]).item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"DepthGNLLLoss needs the output dict of a "
                                         r"models\.DepthFormer"):
        losses.DepthGNLLLoss()(torch.zeros(B, C, H, W), batch)


@pytest.mark.parametrize("kind", ["gnll", "mse", "huber"])
def test_emuformer_loss_depth_loss_option(kind):
    out, batch = _student(), _depth_batch()
    g = _gen(5)
    batch["teacher_probs"] = torch.randn(B, C, H, W, generator=g).softmax(1)
    batch["teacher_depth_var"] = torch.rand(B, H, W, generator=g)
    w = (0.7, 10.0, 2.0)
    loss, terms = losses.EMUFormerLoss(weights=w, depth_loss=kind)(out, batch)
    assert set(terms) == {"ce", kind, "kl", "rmsle"}
    y = batch["depth"]
    depth_ref = {"gnll": lambda: _eq6(out["depth"], out["depth_var"], y),
                 "mse": lambda: ((out["depth"] - y)[y > 0] ** 2).mean(),
                 "huber": lambda: _huber(out["depth"], y, 1.0)}[kind]()
    q, log_p = batch["teacher_probs"], out["logits"].log_softmax(1)
    kl = (q * (q.log() - log_p)).sum(1).mean()  # Eq. 8
    rmsle = ((out["depth_var"].log1p() - batch["teacher_depth_var"].log1p()) ** 2).mean().sqrt()
    ce = F.cross_entropy(out["logits"], batch["mask"])
    assert terms[kind].item() == pytest.approx(depth_ref.item(), rel=1e-6)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert terms["rmsle"].item() == pytest.approx(rmsle.item(), rel=1e-6)
    ref = ce + w[0] * depth_ref + w[1] * kl + w[2] * rmsle
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    if kind != "gnll":  # Tables 9-10: then only the RMSLE (Eq. 9) trains the variance
        (grad,) = torch.autograd.grad(loss, out["depth_var"])
        (ref_grad,) = torch.autograd.grad(w[2] * rmsle, out["depth_var"])
        torch.testing.assert_close(grad, ref_grad)
    with pytest.raises(ValueError, match="depth_loss='l2'"):
        losses.EMUFormerLoss(depth_loss="l2")
    with pytest.raises(ValueError, match="depth_loss='l2'"):
        losses.SegDepthLoss(depth_loss="l2")


# --------------------------------------------------------------------------- 4. encoder dropout
def _encoder_outputs(model: nn.Module, x: torch.Tensor, mc: bool) -> list[torch.Tensor]:
    """The encoder's deepest feature map in two passes (MC mode: MCDropout's two samples)."""
    seen: list[torch.Tensor] = []
    hook = model.encoder.register_forward_hook(lambda m, i, o: seen.append(o[-1].clone()))
    with torch.no_grad():
        if mc:
            ensembles.MCDropout(model, n_samples=2).forward_members(x)
        else:
            model.eval()
            for _ in range(2):
                model(x)
    hook.remove()
    return seen


@pytest.mark.parametrize("cls", ["SegDepthFormer", "DepthFormer"])
def test_mc_dropout_reaches_the_encoder(cls):
    x = torch.rand(1, 3, 32, 32, generator=_gen(0))
    args = (3,) if cls == "SegDepthFormer" else ()
    torch.manual_seed(0)
    model = getattr(models, cls)("mit_b0", *args, dropout=0.2)
    rates = {m.p for m in model.encoder.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.2}
    first, second = _encoder_outputs(model, x, mc=True)
    assert not torch.equal(first, second)
    first, second = _encoder_outputs(model, x, mc=False)  # eval mode: deterministic
    assert torch.equal(first, second)
    torch.manual_seed(0)
    plain = getattr(models, cls)("mit_b0", *args, dropout=0.0)
    first, second = _encoder_outputs(plain, x, mc=True)
    assert torch.equal(first, second)


def test_set_encoder_dropout_counts_the_layers():
    enc = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0), nn.Sequential(nn.Dropout2d(0.1)))
    assert models.set_encoder_dropout(enc, 0.5) == 2
    assert [m.p for m in enc.modules() if isinstance(m, nn.modules.dropout._DropoutNd)] == \
        [0.5, 0.5]
    assert models.set_encoder_dropout(nn.Linear(2, 2), 0.5) == 0


# --------------------------------------------------------------------------- 1. teacher jitter
class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 3, size: tuple[int, int] = (4, 5)):
        g = _gen(3)
        self.images = [torch.rand(3, *size, generator=g) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": 10 + i}


class _PixelDepthNet(nn.Module):
    """A per-pixel model: logits, depth mean and variance from 1x1 convs."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Tanh())
        self.seg, self.depth = nn.Conv2d(8, C, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = self.body(x)
        d = self.depth(f)
        return {"logits": self.seg(f), "depth": d[:, 0].relu() + 1,
                "depth_var": F.softplus(d[:, 1])}


def _teacher() -> ensembles.DeepEnsemble:
    return ensembles.DeepEnsemble([_PixelDepthNet(s) for s in range(2)], vectorize=False)


def _cache(**kw) -> ensembles.TeacherCache:
    kw.setdefault("targets", ("probs", "depth", "depth_var"))
    return ensembles.TeacherCache(_teacher(), _Images(), dtype=torch.float32, **kw)


def test_jittered_teacher_views_match_a_hand_average_and_eq10():
    k, seed = 3, 7
    cache = _cache(teacher_transform=ColorJitter(), teacher_views=k, seed=seed,
                   targets=("probs", "entropy", "depth", "depth_var"))
    data, members = _Images(), _teacher().members
    for i in range(len(data)):
        sample = data[i]
        views = [ColorJitter()(dict(sample), generator=ensembles._view_generator(
            seed, sample["index"], v))["image"] for v in range(k)]
        assert not torch.equal(views[0], views[1])  # the views really differ
        with torch.no_grad():
            outs = [m.eval()(img[None]) for img in views for m in members]  # M·K samples
        probs = torch.stack([o["logits"].softmax(1) for o in outs]).mean(0)[0]
        mu = torch.stack([o["depth"] for o in outs])[:, 0]
        s2 = torch.stack([o["depth_var"] for o in outs])[:, 0]
        eq10 = s2.mean(0) + ((mu - mu.mean(0)) ** 2).mean(0)  # Eq. 10 over all M·K samples
        got = cache[i]
        torch.testing.assert_close(got["teacher_probs"], probs)
        torch.testing.assert_close(got["teacher_entropy"], -(probs * probs.log()).sum(0))
        torch.testing.assert_close(got["teacher_depth"], mu.mean(0))
        torch.testing.assert_close(got["teacher_depth_var"], eq10)


def test_jittered_cache_is_reproducible_and_batch_independent():
    kw = {"teacher_transform": ColorJitter(), "teacher_views": 2}
    a, b = _cache(batch_size=1, **kw), _cache(batch_size=3, **kw)
    for name in a.targets:
        torch.testing.assert_close(a.targets[name], b.targets[name], rtol=1e-6, atol=1e-7)
    other = _cache(seed=1, **kw)
    assert not torch.allclose(a.targets["probs"], other.targets["probs"])
    plain = _cache()
    assert not torch.allclose(a.targets["probs"], plain.targets["probs"])
    same = _cache(teacher_transform=lambda s: s, teacher_views=2)  # identical views
    for name in plain.targets:
        torch.testing.assert_close(same.targets[name], plain.targets[name])


def test_teacher_views_argument_errors():
    with pytest.raises(ValueError, match="teacher_transform"):
        _cache(teacher_views=2)
    with pytest.raises(ValueError, match="expected an int >= 1"):
        _cache(teacher_transform=ColorJitter(), teacher_views=0)
    with pytest.raises(ValueError, match=r"targets \['uncertainty'\] have no exact mean"):
        _cache(teacher_transform=ColorJitter(), teacher_views=2,
               targets=("probs", "uncertainty"))
    with pytest.raises(ValueError, match="colours only"):
        _cache(teacher_transform=lambda s: {**s, "image": s["image"][:, :2]})


def test_student_pipeline_without_jitter_is_one_argument_away():
    default = train_transforms((4, 4))
    student = train_transforms((4, 4), color_jitter=False)
    assert any(isinstance(t, ColorJitter) for t in default.transforms)  # defaults unchanged
    assert not any(isinstance(t, ColorJitter) for t in student.transforms)


# --------------------------------------------------------------------------- 3. evaluate
class _Fixed(nn.Module):
    """Reads its outputs off the image: channel 0 -> depth, 1 -> depth_var, 2 -> logit of
    class 0 against a zero logit of class 1 (so p_0 = sigmoid(channel 2))."""

    def __init__(self, seg: bool = False, uncertainty: bool = False):
        super().__init__()
        self.seg, self.uncertainty = seg, uncertainty

    def forward(self, x):
        out = {"depth": x[:, 0], "depth_var": x[:, 1]}
        if self.seg:
            out["logits"] = torch.stack([x[:, 2], torch.zeros_like(x[:, 2])], 1)
        if self.uncertainty:
            out["uncertainty"] = 1 - x[:, 1]
        return out


def _depth_images():
    """Two hand-counted images, y = 1 on every valid pixel (accurate: max(mu/y, y/mu) < 1.25;
    certain: var below the mean var of the image's valid pixels)."""
    # image 1: mu 1, 1.3, -, 2, 1.1, 1 -> accurate T F - F T T; var .1 .2 - .9 .6 .7 (mean 0.5;
    # the invalid pixel, y = 0 and var 100, must not enter it) -> certain T T - F F F:
    # n_ac 1, n_ic 1, n_iu 1, n_au 2.
    mu1 = torch.tensor([[1.0, 1.3, 5.0], [2.0, 1.1, 1.0]])
    var1 = torch.tensor([[0.1, 0.2, 100.0], [0.9, 0.6, 0.7]])
    y1 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # image 2: mu 1 1 1 / 3 3 3, var 1..6 (mean 3.5): n_ac 3, n_iu 3.
    mu2 = torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    var2 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y2 = torch.ones(2, 3)
    images = [torch.stack([mu, var, torch.zeros_like(mu)])
              for mu, var in ((mu1, var1), (mu2, var2))]
    return images, [y1, y2]


def test_evaluate_depth_uncertainty_hand_counted_and_streamed():
    images, depths = _depth_images()
    one = [{"image": torch.stack(images), "depth": torch.stack(depths)}]
    two = [{"image": im[None], "depth": d[None]} for im, d in zip(images, depths)]
    n_ac, n_au, n_ic, n_iu = 1 + 3, 2, 1, 1 + 3  # hand counts of the two images
    for loader in (one, two):
        res = training.evaluate(_Fixed(), loader, device="cpu")
        assert res["depth_p_accurate_certain"] == pytest.approx(n_ac / (n_ac + n_ic))
        assert res["depth_p_uncertain_inaccurate"] == pytest.approx(n_iu / (n_ic + n_iu))
        assert res["depth_pavpu"] == pytest.approx((n_ac + n_iu) / (n_ac + n_au + n_ic + n_iu))
    ref = metrics.depth_uncertainty_accuracy(one[0]["image"][:, 0], one[0]["depth"],
                                             one[0]["image"][:, 1])
    assert (ref["n_ac"], ref["n_au"], ref["n_ic"], ref["n_iu"]) == (n_ac, n_au, n_ic, n_iu)
    off = training.evaluate(_Fixed(), one, device="cpu", with_uncertainty=False)
    assert "depth_pavpu" not in off and "depth_rmse" in off


def _seg_batch() -> dict[str, torch.Tensor]:
    # p_0 = 0.99, 0.6, 0.95, 0.55 -> pred 0 everywhere; labels 0 1 1 0 -> accurate T F F T.
    # Entropies 0.056, 0.673, 0.199, 0.688 (mean 0.404) -> certain T F T F:
    # n_ac 1 (pixel 1), n_iu 1 (pixel 2), n_ic 1 (pixel 3), n_au 1 (pixel 4).
    p0 = torch.tensor([[0.99, 0.6, 0.95, 0.55]])
    logit = (p0 / (1 - p0)).log()
    var = torch.tensor([[0.9, 0.1, 0.2, 0.8]])  # "uncertainty" output = 1 - var
    image = torch.stack([torch.ones_like(p0), var, logit])[None]
    return {"image": image, "mask": torch.tensor([[[0, 1, 1, 0]]])}


def test_evaluate_seg_uncertainty_entropy_hand_counted_and_streamed():
    batch = _seg_batch()
    res = training.evaluate(_Fixed(seg=True), [batch], device="cpu", seg_uncertainty="entropy")
    assert res["p_accurate_certain"] == pytest.approx(0.5)
    assert res["p_uncertain_inaccurate"] == pytest.approx(0.5)
    assert res["pavpu"] == pytest.approx(0.5)
    p = torch.tensor([0.99, 0.6, 0.95, 0.55])
    h = -(p * p.log() + (1 - p) * (1 - p).log())
    assert res["m_unc"] == pytest.approx(float(h.mean()), rel=1e-5)  # all pixels are class 0
    # streaming: the image twice in one batch == two batches of one
    double = {k: torch.cat([v, v]) for k, v in batch.items()}
    big = training.evaluate(_Fixed(seg=True), [double], device="cpu", seg_uncertainty="entropy")
    streamed = training.evaluate(_Fixed(seg=True), [batch, batch], device="cpu",
                                 seg_uncertainty="entropy")
    for key in ("p_accurate_certain", "p_uncertain_inaccurate", "pavpu", "error_auroc"):
        assert big[key] == pytest.approx(streamed[key]) == pytest.approx(res[key])


def test_evaluate_seg_uncertainty_choices():
    batch = _seg_batch()
    auto = training.evaluate(_Fixed(seg=True), [batch], device="cpu")
    assert "pavpu" not in auto  # no "uncertainty" output: nothing scored, as before
    with pytest.raises(ValueError, match=r"seg_uncertainty='uncertainty'\) but the model's output "
                                         r"has keys \['depth', 'depth_var', 'logits', 'probs'\]"):
        training.evaluate(_Fixed(seg=True), [batch], device="cpu", seg_uncertainty="uncertainty")
    with pytest.raises(ValueError, match=r"seg_uncertainty='std'; expected one of \['auto'"):
        training.evaluate(_Fixed(seg=True), [batch], device="cpu", seg_uncertainty="std")
    # the model's own uncertainty 1 - var = 0.1 0.9 0.8 0.2 (mean 0.5) -> certain T F F T:
    # accurate T F F T -> n_ac 2, n_iu 2: all three ratios 1.
    model = _Fixed(seg=True, uncertainty=True)
    for mode in ("auto", "uncertainty"):
        res = training.evaluate(model, [batch], device="cpu", seg_uncertainty=mode)
        assert res["pavpu"] == res["p_accurate_certain"] == res["p_uncertain_inaccurate"] == 1.0
    assert training.evaluate(model, [batch], device="cpu",
                             seg_uncertainty="entropy")["pavpu"] == pytest.approx(0.5)


class _Recorder(nn.Module):
    """An 'ensemble' whose predict records the statistics it is asked for."""

    def __init__(self):
        super().__init__()
        self.asked: list = []

    def predict(self, x, statistics=None):
        self.asked.append(tuple(statistics))
        probs = torch.stack([x[:, 2].sigmoid(), 1 - x[:, 2].sigmoid()], 1)
        return {"probs": probs, "pred": probs.argmax(1), "uncertainty": x[:, 1]}


def test_evaluate_entropy_does_not_ask_an_ensemble_for_its_std():
    rec = _Recorder()
    training.evaluate(rec, [_seg_batch()], device="cpu", seg_uncertainty="entropy")
    assert "uncertainty" not in rec.asked[0] and "probs" in rec.asked[0]
    training.evaluate(rec, [_seg_batch()], device="cpu")
    assert "uncertainty" in rec.asked[1]


# --------------------------------------------------------------------------- 5. sparsification
def _sparse_example():
    # y = 1; mu = 1, 2, 1.5, 1.1 -> squared errors 0, 1, 0.25, 0.01; uncertainty ranks the
    # pixels 0 (0.4), 2 (0.3), 3 (0.2), 1 (0.1); an invalid fifth pixel (y = 0) is ignored.
    mu = torch.tensor([[1.0, 2.0, 1.5, 1.1, 9.0]])
    y = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    unc = torch.tensor([[0.4, 0.1, 0.3, 0.2, 9.0]])
    return mu, y, unc


def test_sparsification_curve_and_ause_by_hand():
    mu, y, unc = _sparse_example()
    fr = [0.0, 0.25, 0.5, 0.75]  # n = 4: remove 0, 1, 2, 3 pixels
    curve = metrics.sparsification_curve(mu, y, unc, fr)
    by_hand = [math.sqrt(1.26 / 4), math.sqrt(1.26 / 3), math.sqrt(1.01 / 2), 1.0]
    torch.testing.assert_close(curve, torch.tensor(by_hand, dtype=torch.float64))
    oracle = metrics.sparsification_curve(mu, y, None, fr)
    oracle_by_hand = [math.sqrt(1.26 / 4), math.sqrt(0.26 / 3), math.sqrt(0.01 / 2), 0.0]
    torch.testing.assert_close(oracle, torch.tensor(oracle_by_hand, dtype=torch.float64))
    gap = [a - b for a, b in zip(by_hand, oracle_by_hand)]
    area = 0.25 * (gap[0] / 2 + gap[1] + gap[2] + gap[3] / 2) / 0.75
    assert metrics.ause(mu, y, unc, fr) == pytest.approx(area)
    rel = metrics.sparsification_curve(mu, y, unc, fr, error="abs_rel")  # |mu - y| / y
    torch.testing.assert_close(rel, torch.tensor([1.6 / 4, 1.6 / 3, 1.1 / 2, 1.0],
                                                 dtype=torch.float64))
    err = (mu - y) ** 2
    assert metrics.ause(mu, y, err, fr) == pytest.approx(0.0, abs=1e-12)  # perfect ranking


def test_sparsification_is_a_mean_over_images():
    mu, y, unc = _sparse_example()
    mu2, unc2 = torch.tensor([[1.0, 1.2, 3.0, 1.0, 1.0]]), torch.tensor([[5.0, 4, 3, 2, 1]])
    y2 = torch.ones(1, 5)
    both = metrics.sparsification_curve(torch.stack([mu, mu2]), torch.stack([y, y2]),
                                        torch.stack([unc, unc2]))  # [2, 1, 5]: two images
    each = [metrics.sparsification_curve(a, b, c) for a, b, c in ((mu, y, unc),
                                                                  (mu2, y2, unc2))]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2)
    assert len(both) == 20  # default fractions 0, 0.05, ..., 0.95
    with pytest.raises(ValueError, match=r"fractions=\[0.0, 1.0\]"):
        metrics.ause(mu, y, unc, [0.0, 1.0])
    with pytest.raises(ValueError, match="error='mae'"):
        metrics.ause(mu, y, unc, error="mae")
    assert "ause" in metrics.__all__ and "sparsification_curve" in metrics.__all__
    assert metrics.__all__ == sorted(metrics.__all__, key=lambda s: (not s[0].isupper(), s))


def test_a_cache_built_otherwise_is_not_loaded_silently(tmp_path):
    """build_or_load compares how a saved cache was built with what is asked for now."""
    path = tmp_path / "cache.pt"
    kw = {"targets": ("probs", "depth"), "dtype": torch.float32}
    built = ensembles.TeacherCache.build_or_load(path, _teacher(), _Images(), **kw)
    assert built.settings == {"targets": ["probs", "depth"], "teacher_views": 1, "seed": None,
                              "teacher_transform": None}
    again = ensembles.TeacherCache.build_or_load(path, _teacher(), _Images(), **kw)
    assert torch.equal(again.targets["probs"], built.targets["probs"])
    assert again.settings == built.settings
    jitter = {**kw, "teacher_transform": ColorJitter(), "teacher_views": 2, "seed": 3}
    with pytest.raises(ValueError, match=r"built with .*'teacher_views': 1.*but .*"
                                         r"'teacher_views': 2.*delete the file"):
        ensembles.TeacherCache.build_or_load(path, _teacher(), _Images(), **jitter)
    with pytest.raises(ValueError, match=r"'targets'"):
        ensembles.TeacherCache.build_or_load(path, _teacher(), _Images(), targets=("depth_var",))
    jittered = ensembles.TeacherCache.build_or_load(tmp_path / "j.pt", _teacher(), _Images(),
                                                    **jitter)
    assert jittered.settings["seed"] == 3 and jittered.settings["teacher_transform"] == "ColorJitter"
    with pytest.raises(ValueError, match=r"'seed'"):
        ensembles.TeacherCache.build_or_load(tmp_path / "j.pt", _teacher(), _Images(),
                                             **{**jitter, "seed": 4})
    # a file from before settings were recorded still loads
    state = torch.load(path, weights_only=True)
    del state["settings"]
    torch.save(state, tmp_path / "old.pt")
    old = ensembles.TeacherCache.build_or_load(tmp_path / "old.pt", _teacher(), _Images(), **kw)
    assert old.settings is None and torch.equal(old.targets["probs"], built.targets["probs"])
    fewer = ensembles.TeacherCache.build_or_load(path, _teacher(), _Images(), targets=("probs",))
    assert torch.equal(fewer.targets["probs"], built.targets["probs"])  # a superset loads


# --------------------------------------------------------------------------- 5. notebook 04's models
def test_small_mit_is_b0_at_half_width_and_refuses_imagenet_weights():
    torch.manual_seed(0)
    net = models.SegDepthFormer("mit_b0/2", num_classes=5, decoder_dim=16)
    assert net.stage_channels == models.SMALL_MIT["mit_b0/2"]["embed_dims"] == [16, 32, 64, 96]
    blocks = [len(getattr(net.encoder, f"block{i}")) for i in range(1, 5)]
    assert blocks == [1, 1, 1, 1]  # B0 has two per stage
    out = net(torch.rand(2, 3, 32, 64))
    assert out["logits"].shape == (2, 5, 32, 64) and out["depth_var"].shape == (2, 32, 64)
    assert bool((out["depth"] >= 0).all()) and bool((out["depth_var"] > 0).all())
    assert models.SegDepthFormer("mit_b0/2", 5, dropout=0.2) is not None
    with pytest.raises(ValueError, match="no ImageNet weights exist"):
        models.SegFormer("mit_b0/2", 5, pretrained=True)


def test_segdepthformer_sub_ensemble_trains_one_head_and_votes_with_all():
    torch.manual_seed(0)
    dse = models.segdepthformer_sub_ensemble("mit_b0/2", num_classes=4, n_heads=3,
                                             decoder_dim=8)
    x = torch.rand(2, 3, 32, 32, generator=_gen(1))
    dse.train()
    out = dse(x)  # head 0 in turn
    assert set(out) == {"logits", "depth", "depth_var"} and out["logits"].shape == (2, 4, 32, 32)
    (out["logits"].mean() + out["depth"].mean() + out["depth_var"].mean()).backward()
    grads = [any(p.grad is not None for p in h.parameters()) for h in dse.heads]
    assert grads == [True, False, False]
    assert any(p.grad is not None for p in dse.trunk.parameters())
    dse.eval()
    with torch.no_grad():
        feats = dse.trunk(x)
        heads = [h(feats) for h in dse.heads]
        got = dse(x)
    probs = torch.stack([h["logits"].softmax(1) for h in heads]).mean(0)
    mu = torch.stack([h["depth"] for h in heads])
    s2 = torch.stack([h["depth_var"] for h in heads])
    torch.testing.assert_close(got["logits"].exp(), probs)
    torch.testing.assert_close(got["depth"], mu.mean(0))
    torch.testing.assert_close(got["depth_var"],
                               s2.mean(0) + ((mu - mu.mean(0)) ** 2).mean(0))  # Eq. 10


def test_live_teacher_jitters_the_teacher_only_and_matches_its_predict():
    teacher = _teacher()
    images = torch.stack(_Images(n=4).images)
    batch = {"image": images, "mask": torch.zeros(4, 4, 5, dtype=torch.long)}
    plain = ensembles.LiveTeacher(teacher)(batch)
    want = teacher.predict(images)
    torch.testing.assert_close(plain["teacher_probs"], want["probs"])
    torch.testing.assert_close(plain["teacher_depth_var"], want["depth_var"])
    live = ensembles.LiveTeacher(teacher, transform=ColorJitter())
    torch.manual_seed(5)
    jittered = live.teacher_input(images)
    assert not torch.allclose(jittered, images)
    torch.manual_seed(5)
    got = live(batch)
    assert got["image"] is images  # the student's input is untouched
    torch.testing.assert_close(got["teacher_probs"], teacher.predict(jittered)["probs"])
    with pytest.raises(ValueError, match="not teacher statistics"):
        ensembles.LiveTeacher(teacher, targets=("probabilities",))


def test_emuformer_loss_with_a_live_teacher_equals_the_cached_targets():
    teacher = _teacher()
    images = torch.stack(_Images(n=2, size=(H, W)).images)
    batch = {"image": images, **_depth_batch()}
    outputs = _student()
    live = ensembles.LiveTeacher(teacher)
    want, want_terms = losses.EMUFormerLoss()(outputs, live(batch))
    got, terms = losses.EMUFormerLoss(teacher=live)(outputs, batch)
    torch.testing.assert_close(got, want)
    assert terms.keys() == want_terms.keys()
