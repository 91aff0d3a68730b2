"""Tests for SKD's holistic loss: the discriminator, the WGAN-GP penalty, HolisticLoss (one D step
per training call, a frozen D for the student's term) and its checkpointing through fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _train_worker import NUM_CLASSES, make_loader
from torch import Tensor, nn

from minikd import models
from minikd.losses import HolisticLoss, SKDDiscriminator, wgan_gp_penalty
from minikd.training import CKPT_NAME, fit, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _maps(b: int = 3, c: int = 4, h: int = 8, w: int = 16, seed: int = 0):
    """Student/teacher probability maps and an image."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(b, c, h, w, generator=g).mul(3).softmax(1)
    fake = torch.randn(b, c, h, w, generator=g).softmax(1)
    return real, fake, torch.rand(b, 3, h, w, generator=g)


class LinearCritic(nn.Module):
    """D(x|I) = <w, x>: its gradient wrt x is w for every x, so the penalty is (‖w‖ − 1)²."""

    def __init__(self, w: Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: Tensor, image: Tensor) -> Tensor:
        return (x.flatten(1) * self.w.flatten()).sum(1)


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


# --------------------------------------------------------------------------- the penalty


def test_penalty_of_a_linear_critic_is_the_closed_form():
    real, fake, image = _maps()
    w = torch.randn(real[0].shape, generator=torch.Generator().manual_seed(1))
    for seed in range(3):  # any ε gives the same gradient
        gp = wgan_gp_penalty(LinearCritic(w), real, fake, image,
                             generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(gp, (w.norm() - 1) ** 2)
    unit = LinearCritic(w / w.norm())  # 1-Lipschitz with gradient norm exactly 1: no penalty
    assert wgan_gp_penalty(unit, real, fake, image).abs() < 1e-10


def test_penalty_equals_a_per_sample_transcription_of_gulrajani():
    torch.manual_seed(0)
    d = SKDDiscriminator(4, width=4, depth=2)
    real, fake, image = _maps()
    gp = wgan_gp_penalty(d, real, fake, image, generator=torch.Generator().manual_seed(5))
    eps = torch.rand(3, 1, 1, 1, generator=torch.Generator().manual_seed(5))
    terms = []
    for i in range(3):  # Algorithm 1, lines 6-7, one sample at a time
        x_hat = (eps[i] * real[i] + (1 - eps[i]) * fake[i])[None].requires_grad_(True)
        (grad,) = torch.autograd.grad(d(x_hat, image[i:i + 1]).sum(), x_hat)
        terms.append((grad.norm() - 1) ** 2)
    torch.testing.assert_close(gp, torch.stack(terms).mean())
    gp.backward()  # create_graph: the penalty trains D (its weights; the last bias has no say)
    assert all(p.grad.abs().sum() > 0 for p in d.parameters() if p.ndim > 1)


# --------------------------------------------------------------------------- the discriminator


def test_discriminator_scores_one_number_per_image_on_small_inputs():
    d = SKDDiscriminator(5)  # SKD's width 64, four stride-2 convs
    real, _, image = _maps(b=2, c=5, h=32, w=64)
    assert d(real, image).shape == (2,)
    tiny = SKDDiscriminator(5, width=4)
    assert tiny(real[..., :1, :3], image[..., :1, :3]).shape == (2,)


def test_bad_shapes_and_dtypes_say_what_was_received_and_expected():
    hl = HolisticLoss(4, width=4)
    s = torch.randn(2, 4, 8, 16, requires_grad=True)
    image = torch.rand(2, 3, 8, 16)
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 16\).*\(2, 4, 8, 8\)"):
        hl(s, torch.randn(2, 4, 8, 8), image)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 8\).*\(2, 4, 8, 16\).*\(2, 3, 8, 16\)"):
        hl(s, s.detach(), torch.rand(2, 3, 4, 8))
    with pytest.raises(ValueError, match=r"\(2, 5, 8, 16\); expected \(2, 4, H, W\)"):
        hl(torch.randn(2, 5, 8, 16), torch.randn(2, 5, 8, 16), image)
    with pytest.raises(ValueError, match=r"\(4, 8, 16\); expected 4 dims"):
        hl(s[0], s[0].detach(), image)
    with pytest.raises(ValueError, match="dtype torch.int64; expected a floating"):
        hl.discriminator(torch.zeros(2, 4, 8, 16, dtype=torch.long), image)
    with pytest.raises(ValueError, match="dtype torch.uint8; expected a floating"):
        hl(s, s.detach(), torch.zeros(2, 3, 8, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"returned shape \(2, 1\); expected \(2,\)"):
        wgan_gp_penalty(lambda x, i: x.flatten(1).sum(1, keepdim=True), s, s, image)
    with pytest.raises(ValueError, match="lr=0"):
        HolisticLoss(4, lr=0)
    with pytest.raises(ValueError, match="width=0"):
        SKDDiscriminator(4, width=0)


# --------------------------------------------------------------------------- HolisticLoss


def test_student_gradient_reaches_the_logits_and_not_the_discriminator():
    torch.manual_seed(0)
    hl = HolisticLoss(4, width=4)
    real, _, image = _maps()
    logits = torch.randn(3, 4, 8, 16, requires_grad=True)
    loss = hl(logits, real.log(), image)
    assert set(hl.last_terms) == {"d_loss", "gp", "wasserstein"}
    d_grads = [p.grad.clone() for p in hl.discriminator.parameters()]  # from the D step
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    for p, before in zip(hl.discriminator.parameters(), d_grads, strict=True):
        assert torch.equal(p.grad, before) and p.requires_grad
    torch.testing.assert_close(loss, -hl.discriminator(logits.softmax(1), image).mean())


def test_no_discriminator_step_outside_training():
    torch.manual_seed(0)
    hl = HolisticLoss(4, width=4)
    real, fake, image = _maps()
    before = _state(hl.discriminator)
    logits = fake.log().requires_grad_(True)
    with torch.no_grad():
        value = hl(logits, real.log(), image)
    value_plain = hl(fake.log(), real.log(), image)  # logits that need no gradient
    _assert_same(before, _state(hl.discriminator))
    assert not hl.optimizer.state and hl.last_terms == {}
    assert value.shape == () and torch.equal(value, value_plain)


def test_discriminator_learns_to_tell_one_hot_teacher_maps_from_uniform_students():
    torch.manual_seed(0)
    hl = HolisticLoss(4, width=8)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (4, 16, 32), generator=g)
    real = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    fake = torch.full_like(real, 0.25)
    image = torch.rand(4, 3, 16, 32, generator=g)

    def gap() -> float:
        with torch.no_grad():
            d = hl.discriminator
            return float(d(real, image).mean() - d(fake, image).mean())

    start = gap()
    for _ in range(80):  # SKD's Adam lr 4e-4: the gap reaches about 2 (0.6 after 60 steps)
        hl.step_discriminator(real, fake, image)
    assert gap() > start + 0.5, (start, gap())
    assert float(hl.last_terms["wasserstein"]) > 0.5


def test_state_dict_round_trip_is_weights_only_safe(tmp_path):
    torch.manual_seed(0)
    hl = HolisticLoss(4, width=4)
    real, fake, image = _maps()
    hl(fake.log().requires_grad_(True), real.log(), image)
    torch.save(hl.state_dict(), tmp_path / "d.pt")
    torch.manual_seed(1)
    other = HolisticLoss(4, width=4)
    other.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True))
    _assert_same(_state(hl.discriminator), _state(other.discriminator))
    assert other.optimizer.state_dict()["state"][0]["step"] == 1
    with pytest.raises(ValueError, match="lacks \\['optimizer'\\]"):
        other.load_state_dict({"discriminator": {}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_discriminator_follows_the_logits_to_the_gpu_with_its_adam_state():
    torch.manual_seed(0)
    hl = HolisticLoss(4, width=4)
    real, fake, image = _maps()
    hl(fake.log().requires_grad_(True), real.log(), image)  # Adam state on the CPU
    cuda = [t.cuda() for t in (fake.log(), real.log(), image)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = hl(cuda[0].requires_grad_(True), cuda[1], cuda[2])
    assert loss.dtype == torch.float32 and loss.is_cuda
    assert all(p.is_cuda for p in hl.discriminator.parameters())
    assert hl.optimizer.state_dict()["state"][0]["step"] == 2


# --------------------------------------------------------------------------- checkpointing in fit


class HolisticKD:
    """loss_fn(outputs, batch) = CE + 0.1·L_HO against a one-hot "teacher"; crashes on call n."""

    def __init__(self, seed: int, crash_at: int | None = None):
        torch.manual_seed(seed)  # D's init: a resumed run must get D from the checkpoint
        self.holistic = HolisticLoss(NUM_CLASSES, width=4)
        self.calls, self.crash_at = 0, crash_at

    def __call__(self, outputs: Tensor, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        ce = F.cross_entropy(outputs, batch["mask"])
        teacher = 4.0 * F.one_hot(batch["mask"], NUM_CLASSES).permute(0, 3, 1, 2).float()
        ho = self.holistic(outputs, teacher, batch["image"])
        return ce + 0.1 * ho, {"ce": ce.detach(), "ho": ho.detach(), **self.holistic.last_terms}

    def state_dict(self) -> dict:
        return self.holistic.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.holistic.load_state_dict(state)


def _unet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.unet_family("M128/4", NUM_CLASSES)


def _fit(model, loss_fn, **kw):
    kw = {"iterations": 4, "lr": 0.05, "seed": 1, "progress": False, "device": "cpu", **kw}
    return fit(model, make_loader(), loss_fn, **kw)


def test_fit_resumes_the_discriminator_exactly(tmp_path):
    reference, ref_loss = _unet(0), HolisticKD(seed=10)
    h_ref = _fit(reference, ref_loss)
    with pytest.raises(KeyboardInterrupt):
        _fit(_unet(0), HolisticKD(seed=10, crash_at=3), ckpt_dir=tmp_path, ckpt_every=2)
    ckpt = load_checkpoint(tmp_path / CKPT_NAME)  # weights_only=True
    assert ckpt["step"] == 2 and ckpt["loss_fn"]["optimizer"]["state"][0]["step"] == 2
    resumed, res_loss = _unet(99), HolisticKD(seed=77)  # other inits: all from the checkpoint
    h = _fit(resumed, res_loss, ckpt_dir=tmp_path, ckpt_every=2)
    assert h["resumed_from"] == 2 and h["loss"] == h_ref["loss"]
    _assert_same(_state(ref_loss.holistic.discriminator), _state(res_loss.holistic.discriminator))
    _assert_same(_state(reference), _state(resumed))
    adam_ref = ref_loss.holistic.optimizer.state_dict()["state"]
    adam_res = res_loss.holistic.optimizer.state_dict()["state"]
    for i in adam_ref:
        _assert_same(adam_ref[i], adam_res[i])


def test_checkpoint_without_loss_state_still_loads(tmp_path, capsys):
    def crashing_ce(outputs, batch, n=[0]):  # noqa: B006 - counts calls
        n[0] += 1
        if n[0] == 3:
            raise KeyboardInterrupt
        return F.cross_entropy(outputs, batch["mask"])

    with pytest.raises(KeyboardInterrupt):
        _fit(_unet(0), crashing_ce, ckpt_dir=tmp_path, ckpt_every=2)
    assert "loss_fn" not in load_checkpoint(tmp_path / CKPT_NAME)
    loss = HolisticKD(seed=10)
    h = _fit(_unet(0), loss, ckpt_dir=tmp_path, ckpt_every=2)
    assert h["resumed_from"] == 2 and "holds no loss_fn state" in capsys.readouterr().out
    assert loss.holistic.optimizer.state_dict()["state"][0]["step"] == 2  # steps 3 and 4
    assert "loss_fn" in load_checkpoint(tmp_path / CKPT_NAME)
