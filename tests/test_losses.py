"""Tests for minikd.losses: each loss against a loop-by-loop transcription of its equation."""

import math

import pytest
import torch
import torch.nn.functional as F

from minikd import losses as L

B, C, H, W = 2, 4, 3, 5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(seed: int = 0, shape=(B, C, H, W), scale: float = 2.0) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).float() * scale


def _softmax_list(values, tau=1.0):
    m = max(values)
    e = [math.exp((v - m) / tau) for v in values]
    s = sum(e)
    return [x / s for x in e]


# ----------------------------------------------------------------------------- oracles (loops)


def _kd_oracle(s, t, tau, ignore=None):
    """Niemann Eq. 3 as KL, looping over pixels: τ² Σ_c p_t log(p_t / p_s), mean over valid."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for h in range(s.shape[2]):
            for w in range(s.shape[3]):
                if ignore is not None and ignore[b, h, w]:
                    continue
                ps = _softmax_list(s[b, :, h, w].tolist(), tau)
                pt = _softmax_list(t[b, :, h, w].tolist(), tau)
                total += tau**2 * sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
                count += 1
    return total / count


def _niemann_eq3_oracle(s, t, tau):
    """Niemann Eq. 3 literally: −τ² Σ_c σ_c(z_t/τ) log σ_c(z_s/τ), mean over pixels."""
    vals = []
    for b in range(s.shape[0]):
        for h in range(s.shape[2]):
            for w in range(s.shape[3]):
                ps = _softmax_list(s[b, :, h, w].tolist(), tau)
                pt = _softmax_list(t[b, :, h, w].tolist(), tau)
                vals.append(-(tau**2) * sum(q * math.log(p) for p, q in zip(ps, pt, strict=True)))
    return sum(vals) / len(vals)


def _teacher_entropy(t, tau):
    vals = []
    for b in range(t.shape[0]):
        for h in range(t.shape[2]):
            for w in range(t.shape[3]):
                pt = _softmax_list(t[b, :, h, w].tolist(), tau)
                vals.append(-sum(q * math.log(q) for q in pt))
    return sum(vals) / len(vals)


def _cwd_oracle(s, t, tau):
    """CWD: τ² Σ_{n,c} KL(φ(T_nc/τ) ‖ φ(S_nc/τ)) / (N·C), φ = softmax over positions."""
    n, c = s.shape[:2]
    total = 0.0
    for i in range(n):
        for k in range(c):
            ps = _softmax_list(s[i, k].flatten().tolist(), tau)
            pt = _softmax_list(t[i, k].flatten().tolist(), tau)
            total += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    return tau**2 * total / (n * c)


def _rmsle_oracle(pred, target, mask=None):
    """DUDES Eq. 2: sqrt(1/N Σ (log(z+1) − log(q+1))²)."""
    keep = mask.flatten().tolist() if mask is not None else [True] * pred.numel()
    pairs = zip(pred.flatten().tolist(), target.flatten().tolist(), keep, strict=True)
    terms = [(math.log(z + 1) - math.log(q + 1)) ** 2 for q, z, m in pairs if m]
    return math.sqrt(sum(terms) / len(terms))


def _skd_oracle(fs, ft, pool):
    """SKD pair-wise: pool, normalise nodes, Σ_{i,j} (a_T_ij − a_S_ij)² / (HW)² / N (loops)."""
    ps, pt = F.max_pool2d(fs, pool, pool, ceil_mode=True), F.max_pool2d(ft, pool, pool,
                                                                         ceil_mode=True)
    n, _, h, w = ps.shape
    total = 0.0
    for b in range(n):
        nodes_s = [ps[b, :, i, j] for i in range(h) for j in range(w)]
        nodes_t = [pt[b, :, i, j] for i in range(h) for j in range(w)]
        nodes_s = [v / v.norm() for v in nodes_s]
        nodes_t = [v / v.norm() for v in nodes_t]
        for i in range(h * w):
            for j in range(h * w):
                a_s = float(nodes_s[i] @ nodes_s[j])
                a_t = float(nodes_t[i] @ nodes_t[j])
                total += (a_t - a_s) ** 2
    return total / (h * w) ** 2 / n


def _ifv_oracle(fs, ft, labels, num_classes, ignore_index=255):
    """IFVD with loops; labels already at the feature size. Mean over labelled pixels."""
    n, _, h, w = fs.shape
    sq = []

    def proto(f, b, k):  # mean feature of class k in image b
        pts = [f[b, :, i, j] for i in range(h) for j in range(w) if labels[b, i, j] == k]
        return sum(pts) / len(pts)

    for b in range(n):
        for i in range(h):
            for j in range(w):
                k = int(labels[b, i, j])
                if k == ignore_index:
                    continue
                cs = float(F.cosine_similarity(fs[b, :, i, j], proto(fs, b, k), dim=0))
                ct = float(F.cosine_similarity(ft[b, :, i, j], proto(ft, b, k), dim=0))
                sq.append((cs - ct) ** 2)
    return sum(sq) / len(sq)


# ----------------------------------------------------------------------------- pixel-wise KD


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_kd_loss_matches_loop_oracle(tau):
    s, t = _logits(0), _logits(1)
    assert L.kd_loss(s, t, tau).item() == pytest.approx(_kd_oracle(s, t, tau), rel=1e-5)


def test_kd_loss_equals_niemann_eq3_minus_teacher_entropy():
    # Eq. 3 is written as a cross-entropy; KL = CE − H(teacher): same gradient, 0 at S == T.
    s, t, tau = _logits(0), _logits(1), 3.0
    expected = _niemann_eq3_oracle(s, t, tau) - tau**2 * _teacher_entropy(t, tau)
    assert L.kd_loss(s, t, tau).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_zero_when_student_equals_teacher():
    s = _logits(0)
    for tau in (1.0, 4.0):
        assert L.kd_loss(s, s.clone(), tau).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_ignore_mask_really_ignores():
    s, t, tau = _logits(0), _logits(1), 2.0
    ignore = torch.zeros(B, H, W, dtype=torch.bool)
    ignore[0, 1:, 2:] = True
    ignore[1, 0, :] = True
    base = L.kd_loss(s, t, tau, ignore)
    assert base.item() == pytest.approx(_kd_oracle(s, t, tau, ignore), rel=1e-5)
    s2 = torch.where(ignore[:, None], torch.randn_like(s) * 50, s)  # change only ignored pixels
    t2 = torch.where(ignore[:, None], torch.full_like(t, float("inf")), t)
    assert L.kd_loss(s2, t2, tau, ignore).item() == pytest.approx(base.item(), rel=1e-6)


def test_kd_loss_all_ignored_is_zero_and_differentiable():
    s = _logits(0).requires_grad_()
    loss = L.kd_loss(s, _logits(1), 2.0, torch.ones(B, H, W, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(s.grad == 0)


def _grad_norm(tau: float, scale_by_tau2: bool) -> float:
    s = _logits(0, shape=(1, 6, 4, 4), scale=1.0).requires_grad_()
    t = _logits(1, shape=(1, 6, 4, 4), scale=1.0)
    loss = L.kd_loss(s, t, tau)
    if not scale_by_tau2:
        loss = loss / tau**2  # plain KL(softmax(t/τ) ‖ softmax(s/τ)), no τ² factor
    (grad,) = torch.autograd.grad(loss, s)
    return grad.norm().item()


def test_kd_gradient_scale_vs_temperature():
    # d/ds [τ²·KL(softmax(t/τ) ‖ softmax(s/τ))] = τ·(p_s − p_t). For τ ≫ |z|, a first-order
    # expansion of the softmax gives p_s − p_t ≈ ((s − s̄) − (t − t̄)) / (C·τ), so the gradient
    # tends to ((s − s̄) − (t − t̄)) / C: independent of τ. Without τ² the gradient is
    # (p_s − p_t)/τ ≈ ((s − s̄) − (t − t̄)) / (C·τ²): it decays like 1/τ². That is why Hinton
    # multiplies by τ²: changing τ then does not silently change the KD weight.
    g = {tau: _grad_norm(tau, True) for tau in (10.0, 20.0, 40.0)}
    assert g[40.0] / g[20.0] == pytest.approx(1.0, abs=0.02)
    assert g[20.0] / g[10.0] == pytest.approx(1.0, abs=0.05)
    s = _logits(0, shape=(1, 6, 4, 4), scale=1.0)
    t = _logits(1, shape=(1, 6, 4, 4), scale=1.0)
    limit = ((s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))) / 6 / (4 * 4)
    assert g[40.0] == pytest.approx(limit.norm().item(), rel=0.02)
    g_plain = {tau: _grad_norm(tau, False) for tau in (10.0, 20.0, 40.0)}
    assert g_plain[40.0] / g_plain[20.0] == pytest.approx(0.25, rel=0.03)
    assert g_plain[20.0] / g_plain[10.0] == pytest.approx(0.25, rel=0.05)


def test_kd_gradient_at_tau_one_is_softmax_difference():
    s, t = _logits(0).requires_grad_(), _logits(1)
    (grad,) = torch.autograd.grad(L.kd_loss(s, t, 1.0), s)
    expected = (s.softmax(1) - t.softmax(1)) / (B * H * W)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_kd_reduction_conventions_ratios():
    s, t, tau = _logits(0), _logits(1), 2.0
    ours = L.kd_loss(s, t, tau).item()
    expected = {"minikd": 1.0, "cirkd": 1.0, "skd": B, "ifvd": 1.0 / C, "torchdistill": H * W,
                "cwd": H * W / C}
    assert set(expected) == set(L.KD_CONVENTIONS)
    for name, factor in expected.items():
        got = L.kd_loss_reduction(s, t, tau, convention=name).item()
        assert got == pytest.approx(ours * factor, rel=1e-5), name
        assert L.kd_convention_factor(name, B, C, H, W) == pytest.approx(factor), name


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # IFVD relies on that 'mean'
def test_kd_reduction_conventions_match_framework_calls():
    s, t, tau = _logits(0), _logits(1), 2.0
    log_ps, pt = F.log_softmax(s / tau, 1), F.softmax(t / tau, 1)
    # IFVD: nn.KLDivLoss() default 'mean' over every element (τ = 1 in IFVD; τ² for comparability)
    ifvd = tau**2 * torch.nn.KLDivLoss()(log_ps, pt)
    # torchdistill KDLoss: KLDivLoss('batchmean') on the 4-D tensors, × τ²
    td = tau**2 * torch.nn.KLDivLoss(reduction="batchmean")(log_ps, pt)
    # CIRKD: reshape to [B·H·W, C], 'batchmean', × τ²
    def flat(x):
        return x.permute(0, 2, 3, 1).reshape(-1, C)

    cirkd = tau**2 * F.kl_div(flat(log_ps), flat(pt), reduction="batchmean")
    for name, ref in (("ifvd", ifvd), ("torchdistill", td), ("cirkd", cirkd)):
        got = L.kd_loss_reduction(s, t, tau, convention=name)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5), name


def test_kd_reduction_unknown_convention():
    with pytest.raises(ValueError, match="convention"):
        L.kd_loss_reduction(_logits(0), _logits(1), 1.0, convention="mean")


# ----------------------------------------------------------------------------- mixing


def test_mixing_formulas():
    ce, kd = torch.tensor(2.0), torch.tensor(0.5)
    assert L.ce_plus_kd(ce, kd, 0.1).item() == pytest.approx(2.05)
    assert L.alpha_mix(ce, kd, 0.1).item() == pytest.approx(0.1 * 2.0 + 0.9 * 0.5)
    # α·CE + (1−α)·KD = α·(CE + λ·KD) with λ = (1 − α)/α
    alpha = 0.25
    lam = (1 - alpha) / alpha
    assert L.alpha_mix(ce, kd, alpha).item() == pytest.approx(alpha * L.ce_plus_kd(ce, kd, lam))
    with pytest.raises(ValueError):
        L.alpha_mix(ce, kd, 1.5)
    with pytest.raises(ValueError):
        L.ce_plus_kd(ce, kd, -1.0)


def test_cross_entropy_ignores_and_all_void_is_zero():
    logits = _logits(0)
    labels = torch.randint(0, C, (B, H, W), generator=_gen(2))
    labels[0, 0, :] = 255
    ref = F.cross_entropy(logits, labels, ignore_index=255)
    assert L.cross_entropy(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)
    assert L.cross_entropy(logits, torch.full_like(labels, 255)).item() == 0.0


# ----------------------------------------------------------------------------- CWD


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_loop_oracle(tau):
    s, t = _logits(0), _logits(1)
    assert L.cwd_loss(s, t, tau).item() == pytest.approx(_cwd_oracle(s, t, tau), rel=1e-5)


def test_cwd_zero_when_equal():
    s = _logits(3)
    assert L.cwd_loss(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- RMSLE, KL, GNLL


def _uncertainty(seed, shape=(B, H, W)):
    return torch.rand(shape, generator=_gen(seed))


def test_rmsle_matches_dudes_eq2():
    p, t = _uncertainty(0), _uncertainty(1)
    assert L.rmsle_loss(p, t).item() == pytest.approx(_rmsle_oracle(p, t), rel=1e-5)
    mask = _uncertainty(2) > 0.3
    assert L.rmsle_loss(p, t, mask).item() == pytest.approx(_rmsle_oracle(p, t, mask), rel=1e-5)


def test_rmsle_mask_really_masks_and_zero_is_safe():
    p, t = _uncertainty(0), _uncertainty(1)
    mask = _uncertainty(2) > 0.3
    base = L.rmsle_loss(p, t, mask).item()
    p2 = torch.where(mask, p, torch.full_like(p, 7.0))
    t2 = torch.where(mask, t, torch.full_like(t, 0.0))
    assert L.rmsle_loss(p2, t2, mask).item() == pytest.approx(base, rel=1e-6)
    q = p.clone().requires_grad_()
    loss = L.rmsle_loss(q, p.clone())
    assert loss.item() == 0.0
    loss.backward()  # plain sqrt would give NaN here
    assert torch.isfinite(q.grad).all()
    assert L.rmsle_loss(p, t, torch.zeros_like(mask)).item() == 0.0


def test_rmsle_rejects_negative():
    with pytest.raises(ValueError, match="negative"):
        L.rmsle_loss(torch.full((1, 2, 2), -0.5), torch.zeros(1, 2, 2))


def test_ensemble_kl_matches_emuformer_eq8():
    s = _logits(0)
    members = torch.stack([_logits(10 + m).softmax(1) for m in range(3)])
    q = members.mean(0)
    total, n = 0.0, 0
    for b in range(B):
        for h in range(H):
            for w in range(W):
                p = _softmax_list(s[b, :, h, w].tolist())
                qq = q[b, :, h, w].tolist()
                # Eq. 8: q log(q / p)
                total += sum(qc * math.log(qc / pc) for qc, pc in zip(qq, p, strict=True))
                n += 1
    assert L.ensemble_kl_loss(s, q).item() == pytest.approx(total / n, rel=1e-5)
    # Same as kd_loss at τ = 1 with teacher logits log q; zero when student's softmax == q
    assert L.ensemble_kl_loss(s, q).item() == pytest.approx(L.kd_loss(s, q.log()).item(),
                                                            rel=1e-5)
    assert L.ensemble_kl_loss(q.log(), q).item() == pytest.approx(0.0, abs=1e-6)


def test_ensemble_kl_ignore_and_fp16_zeros():
    s = _logits(0)
    q = _logits(1).softmax(1).half()
    ignore = _uncertainty(3) > 0.5
    base = L.ensemble_kl_loss(s, q, ignore).item()
    q2 = torch.where(ignore[:, None], torch.zeros_like(q), q)
    s2 = torch.where(ignore[:, None], torch.randn_like(s) * 9, s)
    assert L.ensemble_kl_loss(s2, q2, ignore).item() == pytest.approx(base, rel=1e-6)
    onehot = F.one_hot(torch.zeros(B, H, W, dtype=torch.long), C).permute(0, 3, 1, 2).float()
    assert torch.isfinite(L.ensemble_kl_loss(s, onehot))


@pytest.mark.parametrize("full", [False, True])
def test_depth_gnll_equals_manual_formula(full):
    mean = torch.rand(B, H, W, generator=_gen(0)) * 10
    var = torch.rand(B, H, W, generator=_gen(1)) + 0.1
    target = torch.rand(B, H, W, generator=_gen(2)) * 10
    target[0, 0, :] = 0.0  # invalid
    valid = target > 0
    manual = 0.5 * (var.log() + (target - mean) ** 2 / var)
    if full:
        manual = manual + 0.5 * math.log(2 * math.pi)
    expected = manual[valid].mean().item()
    got = L.depth_gnll_loss(mean, var, target, valid, full=full)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert L.depth_gnll_loss(mean, var, target, None, full=full).item() == pytest.approx(
        expected, rel=1e-5)  # None -> target > 0
    # invalid pixels really ignored
    mean2 = torch.where(valid, mean, torch.full_like(mean, 1e6))
    assert L.depth_gnll_loss(mean2, var, target, valid, full=full).item() == pytest.approx(
        expected, rel=1e-5)
    assert L.depth_gnll_loss(mean, var, target, torch.zeros_like(valid)).item() == 0.0


def test_dudes_and_emuformer_composites():
    logits = _logits(0).requires_grad_()
    labels = torch.randint(0, C, (B, H, W), generator=_gen(1))
    unc, unc_t = _uncertainty(2), _uncertainty(3)
    total, terms = L.dudes_loss(logits, unc, labels, unc_t)
    assert set(terms) == {"ce", "rmsle"}
    assert total.item() == pytest.approx(
        F.cross_entropy(logits, labels).item() + _rmsle_oracle(unc, unc_t), rel=1e-5)

    depth, depth_t = torch.rand(B, H, W) * 5 + 0.1, torch.rand(B, H, W) * 5 + 0.1
    var, var_t = torch.rand(B, H, W) + 0.1, torch.rand(B, H, W) + 0.1
    q = _logits(4).softmax(1)
    total, terms = L.emuformer_loss(logits, depth, var, labels, depth_t, q, var_t)
    assert set(terms) == {"ce", "gnll", "kl", "rmsle"}
    expected = (terms["ce"] + 1 * terms["gnll"] + 10 * terms["kl"] + 1 * terms["rmsle"]).item()
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert terms["rmsle"].item() == pytest.approx(_rmsle_oracle(var, var_t), rel=1e-5)  # on σ²
    total.backward()
    assert logits.grad is not None


# ----------------------------------------------------------------------------- feature losses


def _feats(seed, c=6, h=8, w=8):
    return torch.randn(B, c, h, w, generator=_gen(seed))


def test_skd_original_matches_loop_oracle():
    fs, ft = _feats(0), _feats(1, c=9)  # channel counts may differ
    got = L.skd_pairwise_loss(fs, ft, pool_scale=0.5)  # kernel (4, 4) -> 2x2 nodes
    assert got.item() == pytest.approx(_skd_oracle(fs, ft, (4, 4)), rel=1e-4)


def test_skd_cirkd_variant_matches_loop_oracle():
    fs, ft = _feats(0), _feats(1)
    got = L.skd_pairwise_loss(fs, ft, variant="cirkd")  # kernel (2, 2) -> 4x4 nodes
    assert got.item() == pytest.approx(_skd_oracle(fs, ft, (2, 2)), rel=1e-4)


def test_skd_original_detaches_norm_cirkd_does_not():
    # pool_scale 0.25 on 8x8 gives the CIRKD 2x2 kernel: same value, different gradient, because
    # the original code treats the L2 norm as a constant (.detach()) and CIRKD does not.
    fs, ft = _feats(0).requires_grad_(), _feats(1)
    orig = L.skd_pairwise_loss(fs, ft, pool_scale=0.25, variant="original")
    cirkd = L.skd_pairwise_loss(fs, ft, variant="cirkd")
    assert orig.item() == pytest.approx(cirkd.item(), rel=1e-6)
    (g_orig,) = torch.autograd.grad(orig, fs)
    (g_cirkd,) = torch.autograd.grad(cirkd, fs)
    assert torch.isfinite(g_orig).all() and torch.isfinite(g_cirkd).all()
    assert not torch.allclose(g_orig, g_cirkd)
    with pytest.raises(ValueError, match="variant"):
        L.skd_pairwise_loss(fs, ft, variant="other")


def test_skd_zero_when_equal():
    f = _feats(0)
    assert L.skd_pairwise_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-10)
    assert L.skd_pairwise_loss(f, f.clone(), variant="cirkd").item() == pytest.approx(0.0,
                                                                                     abs=1e-10)


def _labels(seed, h=8, w=8, k=3):
    lab = torch.randint(0, k, (B, h, w), generator=_gen(seed))
    lab[0, :2, :3] = 255
    return lab


def test_ifvd_matches_loop_oracle():
    fs, ft, lab = _feats(0), _feats(1, c=5), _labels(2)
    got = L.ifvd_loss(fs, ft, lab, num_classes=3)
    assert got.item() == pytest.approx(_ifv_oracle(fs, ft, lab, 3), rel=1e-4)


def test_ifvd_nearest_resizes_labels():
    fs, ft = _feats(0, h=4, w=4), _feats(1, h=4, w=4)
    lab = _labels(2, h=8, w=8)
    small = F.interpolate(lab[:, None].float(), size=(4, 4), mode="nearest")[:, 0].long()
    got = L.ifvd_loss(fs, ft, lab, num_classes=3)
    assert got.item() == pytest.approx(_ifv_oracle(fs, ft, small, 3), rel=1e-4)


def test_ifvd_ignore_handling_and_original_count():
    fs, ft, lab = _feats(0), _feats(1), _labels(2)
    ignore = lab == 255
    ours = L.ifvd_loss(fs, ft, lab, 3)
    fs2 = torch.where(ignore[:, None], torch.randn_like(fs) * 10, fs)
    assert L.ifvd_loss(fs2, ft, lab, 3).item() == pytest.approx(ours.item(), rel=1e-5)
    frac_valid = (~ignore).float().mean().item()
    original = L.ifvd_loss(fs, ft, lab, 3, count_ignored=True)
    assert original.item() == pytest.approx(ours.item() * frac_valid, rel=1e-5)
    assert L.ifvd_loss(fs, ft, torch.full_like(lab, 255), 3).item() == 0.0
    with pytest.raises(ValueError, match=r"labels contain \[7\]"):
        L.ifvd_loss(fs, ft, torch.full_like(lab, 7), 3)


def test_ifvd_zero_when_equal():
    f, lab = _feats(0), _labels(2)
    assert L.ifvd_loss(f, f.clone(), lab, 3).item() == pytest.approx(0.0, abs=1e-10)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b: L.kd_loss(a, b),
        lambda a, b: L.kd_loss_reduction(a, b),
        lambda a, b: L.cwd_loss(a, b),
        lambda a, b: L.ensemble_kl_loss(a, b.softmax(1)),
        lambda a, b: L.rmsle_loss(a.abs(), b.abs()),
        lambda a, b: L.skd_pairwise_loss(a, b),
        lambda a, b: L.ifvd_loss(a, b, torch.zeros(B, H, W, dtype=torch.long), C),
    ],
)
def test_mismatched_shapes_name_both_shapes(call):
    a, b = _logits(0), _logits(1, shape=(B, C, H + 1, W))
    with pytest.raises(ValueError) as err:
        call(a, b)
    assert str(tuple(a.shape)) in str(err.value) and str(tuple(b.shape)) in str(err.value)


def test_gnll_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 3, 4\)|\(2, 3, 4\).*\(2, 3, 5\)"):
        L.depth_gnll_loss(torch.rand(2, 3, 5), torch.rand(2, 3, 5), torch.rand(2, 3, 4), None)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_temperature_must_be_positive(tau):
    s, t = _logits(0), _logits(1)
    for fn in (L.kd_loss, L.cwd_loss, L.kd_loss_reduction):
        with pytest.raises(ValueError, match="temperature"):
            fn(s, t, tau)
    with pytest.raises(ValueError, match="temperature"):
        L.DistillationLoss(tau, lam=1.0)


def test_bad_ignore_mask():
    with pytest.raises(ValueError, match="ignore_mask"):
        L.kd_loss(_logits(0), _logits(1), 1.0, torch.zeros(B, H, W))  # float, not bool


# ----------------------------------------------------------------------------- fit() glue


def test_distillation_loss_fn_from_logits_and_probs():
    s = _logits(0)
    t = _logits(1)
    labels = torch.randint(0, C, (B, H, W), generator=_gen(2))
    labels[0, 0, 0] = 255
    fn = L.DistillationLoss(2.0, lam=0.1)
    loss, terms = fn(s, {"mask": labels, "teacher_logits": t})
    assert set(terms) == {"ce", "kd"}
    ce = F.cross_entropy(s, labels, ignore_index=255)
    kd = L.kd_loss(s, t, 2.0)
    assert loss.item() == pytest.approx((ce + 0.1 * kd).item(), rel=1e-5)
    # cached probabilities (fp16) give the same KD: softmax(log q / τ) = softmax(t / τ)
    _, terms_p = fn({"logits": s}, {"mask": labels, "teacher_probs": t.softmax(1).half()})
    assert terms_p["kd"].item() == pytest.approx(kd.item(), rel=1e-2)
    fn_a = L.DistillationLoss(2.0, alpha=0.25)
    loss_a, _ = fn_a(s, {"mask": labels, "teacher_logits": t})
    assert loss_a.item() == pytest.approx((0.25 * ce + 0.75 * kd).item(), rel=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        L.DistillationLoss(1.0)
    with pytest.raises(ValueError, match="teacher_probs"):
        fn(s, {"mask": labels})


def test_distillation_loss_skips_padded_teacher_pixels():
    s, t = _logits(0), _logits(1)
    labels = torch.randint(0, C, (B, H, W), generator=_gen(2))
    probs = t.softmax(1)
    pad = torch.zeros(B, H, W, dtype=torch.bool)
    pad[:, -1, :] = True  # RandomCrop padding: teacher maps padded with 0, labels with 255
    probs = torch.where(pad[:, None], torch.zeros_like(probs), probs)
    labels = torch.where(pad, torch.full_like(labels, 255), labels)
    _, terms = L.DistillationLoss(4.0, lam=1.0)(s, {"mask": labels, "teacher_probs": probs})
    assert terms["kd"].item() == pytest.approx(L.kd_loss(s, t, 4.0, pad).item(), rel=1e-4)
    # with the validity map of RandomCrop, zero-padded teacher *logits* are skipped as well
    logits_t = torch.where(pad[:, None], torch.zeros_like(t), t)
    batch = {"mask": labels, "teacher_logits": logits_t, "valid": ~pad}
    _, terms = L.DistillationLoss(4.0, lam=1.0)(s, batch)
    assert terms["kd"].item() == pytest.approx(L.kd_loss(s, t, 4.0, pad).item(), rel=1e-5)


def test_dudes_and_emuformer_loss_fns():
    s = _logits(0)
    labels = torch.randint(0, C, (B, H, W), generator=_gen(1))
    out = {"logits": s, "uncertainty": _uncertainty(2)}
    loss, terms = L.DUDESLoss()(out, {"mask": labels, "teacher_unc": _uncertainty(3).half()})
    assert set(terms) == {"ce", "rmsle"} and torch.isfinite(loss)
    out = {"logits": s, "depth": torch.rand(B, H, W) + 1, "depth_var": torch.rand(B, H, W) + .1}
    batch = {"mask": labels, "depth": torch.rand(B, H, W) + 1,
             "teacher_probs": _logits(4).softmax(1).half(),
             "teacher_depth_var": torch.rand(B, H, W)}
    loss, terms = L.EMUFormerLoss()(out, batch)
    assert set(terms) == {"ce", "gnll", "kl", "rmsle"} and torch.isfinite(loss)


def test_class_wise_uncertainty_loss_is_ce_plus_rmsle_over_the_whole_map():
    s = _logits(0)
    labels = torch.randint(0, C, (B, H, W), generator=_gen(1))
    class_unc, target = _uncertainty(2, (B, C, H, W)), _uncertainty(3, (B, C, H, W))
    out = {"logits": s, "class_uncertainty": class_unc, "uncertainty": class_unc[:, 0]}
    loss, terms = L.ClassWiseUncertaintyLoss()(out, {"mask": labels, "teacher_unc": target.half()})
    assert terms["rmsle"].item() == pytest.approx(_rmsle_oracle(class_unc, target.half().float()),
                                                  rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, labels).item(), rel=1e-6)
    assert loss.item() == pytest.approx((terms["ce"] + terms["rmsle"]).item(), rel=1e-6)
    _, same = L.ClassWiseUncertaintyLoss()(out, {"mask": labels, "teacher_unc": class_unc})
    assert same["rmsle"].item() == 0.0


def test_class_wise_uncertainty_loss_rejects_the_dudes_target():
    out = {"logits": _logits(0), "class_uncertainty": _uncertainty(2, (B, C, H, W))}
    labels = torch.randint(0, C, (B, H, W), generator=_gen(1))
    with pytest.raises(ValueError, match="DUDESLoss"):
        L.ClassWiseUncertaintyLoss()(out, {"mask": labels, "teacher_unc": _uncertainty(3)})
    with pytest.raises(ValueError, match="teacher cache"):
        L.ClassWiseUncertaintyLoss(teacher_key="teacher_class_std")(out, {"mask": labels})
