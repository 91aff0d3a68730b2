"""Ensemble statistics streamed over members (issue 16): the same numbers as the stacked
implementation they replace and as the plain formulas, for 1, 2 and 10 members, with and without
depth; only the statistics asked for are computed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from minikd.ensembles import (
    STATISTICS,
    DeepEnsemble,
    DeepSubEnsemble,
    MCDropout,
    StreamingStatistics,
    TeacherCache,
    ensemble_statistics,
)

B, C, H, W = 2, 5, 6, 7


# ----------------------------------------------------------------------------- the oracles
def stacked_statistics_before_issue_16(member_outputs: dict, correction: int = 1) -> dict:
    """Verbatim the stacked ``ensemble_statistics`` (with ``dudes_uncertainty`` and
    ``depth_predictive_variance`` inlined) that minikd used before streaming."""
    out = {}
    if "logits" in member_outputs:
        member_probs = member_outputs["logits"].float().softmax(dim=2)
        probs = member_probs.mean(0)
        entropy = torch.special.entr(probs).sum(1)
        expected_entropy = torch.special.entr(member_probs).sum(2).mean(0)
        pred = probs.argmax(1)
        m = member_probs.shape[0]
        index = pred[None, :, None].expand(m, -1, 1, -1, -1)
        p_pred = member_probs.gather(2, index).squeeze(2)
        unc = torch.zeros_like(p_pred[0]) if m - correction <= 0 else \
            p_pred.std(dim=0, correction=correction)
        out.update(probs=probs, pred=pred, uncertainty=unc, entropy=entropy,
                   mutual_info=(entropy - expected_entropy).clamp_min(0))
    if "depth" in member_outputs:
        depth = member_outputs["depth"].float()
        var = member_outputs.get("depth_var")
        spread = depth.var(dim=0, correction=0)
        out["depth"] = depth.mean(0)
        out["depth_var"] = spread if var is None else var.float().mean(0) + spread
    return out


def plain_formulas(logits: Tensor, correction: int = 1) -> dict:
    """The statistics pixel by pixel, as the papers write them (python loops over pixels)."""
    m = logits.shape[0]
    p = logits.double().softmax(2)
    out = {k: torch.zeros(B, H, W, dtype=torch.float64) for k in ("unc", "ent", "mi")}
    for b in range(B):
        for i in range(H):
            for j in range(W):
                members = [p[t, b, :, i, j] for t in range(m)]
                mean = sum(members) / m
                c = int(torch.argmax(mean))
                xs = [float(q[c]) for q in members]
                mu = sum(xs) / m
                out["unc"][b, i, j] = math.sqrt(sum((x - mu) ** 2 for x in xs) / (m - correction)) \
                    if m - correction > 0 else 0.0
                h = -sum(float(q) * math.log(float(q)) for q in mean if q > 0)
                eh = sum(-sum(float(q) * math.log(float(q)) for q in r if q > 0)
                         for r in members) / m
                out["ent"][b, i, j], out["mi"][b, i, j] = h, max(h - eh, 0.0)
    return out


def _stream(outputs: dict, statistics=None, correction: int = 1) -> dict:
    acc = StreamingStatistics(statistics, correction)
    for i in range(next(iter(outputs.values())).shape[0]):
        acc.update({k: v[i] for k, v in outputs.items()})
    return acc.compute()


def _member_outputs(m: int, depth: bool, seed: int = 0, scale: float = 3.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"logits": torch.randn(m, B, C, H, W, generator=g) * scale}
    if depth:
        out["depth"] = torch.rand(m, B, H, W, generator=g) * 40 + 1
        out["depth_var"] = torch.rand(m, B, H, W, generator=g) * 2
    return out


# ----------------------------------------------------------------------------- equal numbers
@pytest.mark.parametrize("m", [1, 2, 10])
@pytest.mark.parametrize("depth", [False, True])
@pytest.mark.parametrize("correction", [0, 1])
def test_streaming_equals_the_stacked_implementation(m, depth, correction):
    outputs = _member_outputs(m, depth, seed=m)
    expected = stacked_statistics_before_issue_16(outputs, correction)
    got = _stream(outputs, correction=correction)
    assert sorted(got) == sorted(expected)
    for k in expected:
        if k == "pred":
            assert torch.equal(got[k], expected[k])
        else:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=2e-6, msg=k)
    # the public stacked entry point feeds the same accumulator
    for k, v in ensemble_statistics(outputs, correction).items():
        torch.testing.assert_close(v, got[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("m", [1, 2, 10])
def test_streaming_equals_the_plain_formulas(m):
    logits = _member_outputs(m, False, seed=10 + m)["logits"]
    got = _stream({"logits": logits})
    plain = plain_formulas(logits)
    torch.testing.assert_close(got["uncertainty"].double(), plain["unc"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["entropy"].double(), plain["ent"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["mutual_info"].double(), plain["mi"], rtol=1e-4, atol=2e-6)


def test_depth_only_members_and_depth_without_variance():
    outputs = _member_outputs(10, True, seed=3)
    depth_only = {k: outputs[k] for k in ("depth", "depth_var")}
    got = _stream(depth_only)
    assert sorted(got) == ["depth", "depth_var"]
    mu, s2 = depth_only["depth"].double(), depth_only["depth_var"].double()
    eq10 = s2.mean(0) + ((mu - mu.mean(0)) ** 2).mean(0)  # EMUFormer Eq. 10 with 1/T
    torch.testing.assert_close(got["depth_var"].double(), eq10, rtol=1e-5, atol=1e-5)
    no_var = _stream({"depth": outputs["depth"]})
    torch.testing.assert_close(no_var["depth_var"].double(), mu.var(0, correction=0),
                               rtol=1e-5, atol=1e-5)


def test_near_identical_members_keep_a_tiny_std_without_cancellation():
    """Shifted sums: members that agree to 1e-4 still give their true (tiny) std, where
    Σp² − (Σp)²/M in float32 would lose it to rounding."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, B, C, H, W, generator=g) * 4
    logits = base + 1e-4 * torch.randn(10, B, C, H, W, generator=g)
    got = _stream({"logits": logits})
    index = got["pred"][None, :, None].expand(10, -1, 1, -1, -1)
    p32 = logits.softmax(2).gather(2, index)[:, :, 0]  # the members' float32 p[pred]
    exact = p32.double().std(0)  # their std, two-pass in float64
    naive = ((p32.square().sum(0) - p32.sum(0).square() / 10) / 9).clamp_min(0).sqrt()
    assert float(exact.max()) > 0
    torch.testing.assert_close(got["uncertainty"].double(), exact, rtol=1e-2, atol=1e-9)
    spread = exact > 1e-7
    naive_error = (naive.double() - exact).abs()[spread] / exact[spread]
    assert float(naive_error.max()) > 0.1  # what the shift avoids


def test_max_indices_equals_argmax_with_ties():
    probs = torch.tensor([0.25, 0.25, 0.5, 0.0])[None, :, None, None].repeat(1, 1, 2, 2)
    probs[0, :, 0, 0] = torch.tensor([0.4, 0.4, 0.1, 0.1])  # tie between 0 and 1
    probs[0, :, 1, 1] = 0.25  # four-way tie
    assert torch.equal(probs.max(1).indices, probs.argmax(1))
    x = torch.randint(0, 3, (4, 17, 33, 29)).float()  # many ties
    assert torch.equal(x.max(1).indices, x.argmax(1))


# ----------------------------------------------------------------------------- only what is asked
@pytest.mark.parametrize("asked", [("uncertainty",), ("probs",), ("mutual_info",),
                                   ("pred", "entropy"), ("depth_var",), ("depth", "probs")])
def test_only_the_statistics_asked_for(asked):
    outputs = _member_outputs(4, True, seed=5)
    full = _stream(outputs)
    got = _stream(outputs, asked)
    assert sorted(got) == sorted(asked)
    for k in asked:
        torch.testing.assert_close(got[k], full[k], rtol=0, atol=0)


def test_uncertainty_only_holds_no_entropy_and_probs_only_no_squares():
    outputs = _member_outputs(3, False)
    acc = StreamingStatistics(("probs",))
    for i in range(3):
        acc.update({"logits": outputs["logits"][i]})
    assert acc.probs.s2 is None and acc.entropy_sum is None
    acc = StreamingStatistics(("uncertainty",))
    for i in range(3):
        acc.update({"logits": outputs["logits"][i]})
    assert acc.probs.s2 is not None and acc.entropy_sum is None


def test_bad_statistics_requests_say_what_to_do():
    with pytest.raises(ValueError, match=r"unknown names \['softmax'\]"):
        StreamingStatistics(("softmax",))
    with pytest.raises(ValueError, match="no member output"):
        StreamingStatistics().compute()
    acc = StreamingStatistics(("depth",))
    acc.update(torch.randn(B, C, H, W))
    with pytest.raises(ValueError, match="need 'depth'"):
        acc.compute()
    acc = StreamingStatistics()
    acc.update(torch.randn(B, C, H, W))
    with pytest.raises(ValueError, match=r"member 1 returned 'logits' of shape .* \(4 classes vs 5\)"):
        acc.update(torch.randn(B, 4, H, W))
    assert set(STATISTICS) >= {"probs", "pred", "uncertainty", "depth_var"}


# ----------------------------------------------------------------------------- the ensembles
class SegDepth(nn.Module):
    def __init__(self, depth: bool, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, C + 2, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.depth = depth

    def forward(self, x):
        y = self.drop(self.conv(x))
        if not self.depth:
            return y[:, :C]
        return {"logits": y[:, :C], "depth": y[:, C].exp(),
                "depth_var": nn.functional.softplus(y[:, C + 1])}


@pytest.mark.parametrize("m", [1, 2, 10])
@pytest.mark.parametrize("depth", [False, True])
def test_deep_ensemble_predict_streams_the_same_numbers(m, depth):
    torch.manual_seed(m)
    ens = DeepEnsemble([SegDepth(depth) for _ in range(m)], vectorize=False)
    x = torch.randn(B, 3, H, W)
    stacked = ens.predict(x, return_members=True)
    streamed = ens.predict(x)
    oracle = stacked_statistics_before_issue_16(ens.forward_members(x))
    assert sorted(streamed) == sorted(oracle) and "member_probs" in stacked
    for k in oracle:
        torch.testing.assert_close(streamed[k], oracle[k], rtol=1e-5, atol=2e-6, msg=k)
        torch.testing.assert_close(streamed[k], stacked[k], rtol=0, atol=0, msg=k)
    assert sorted(ens.predict(x, statistics="uncertainty")) == ["uncertainty"]


def test_deep_ensemble_streaming_never_stacks_members(monkeypatch):
    ens = DeepEnsemble([SegDepth(False) for _ in range(3)], vectorize=False)
    monkeypatch.setattr(ens, "forward_members", lambda x: pytest.fail("stacked all members"))
    out = ens.predict(torch.randn(B, 3, H, W))
    assert out["probs"].shape == (B, C, H, W)


def test_mc_dropout_and_sub_ensemble_stream_the_same_numbers():
    x = torch.randn(B, 3, H, W)
    mc = MCDropout(SegDepth(True, dropout=0.5), n_samples=6)
    torch.manual_seed(0)
    streamed = mc.predict(x)
    torch.manual_seed(0)  # same dropout masks in the same order
    stacked = mc.predict(x, return_members=True)
    for k in streamed:
        torch.testing.assert_close(streamed[k], stacked[k], rtol=1e-6, atol=1e-6, msg=k)
    sub = DeepSubEnsemble(nn.Conv2d(3, 8, 1), lambda: nn.Conv2d(8, C, 1), n_heads=4)
    got, ref = sub.predict(x), sub.predict(x, return_members=True)
    for k in got:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    sub.eval()
    torch.testing.assert_close(sub(x)["logits"].exp(), ref["probs"], rtol=1e-6, atol=1e-7)


class Spy(nn.Module):
    """An ensemble stand-in that records which statistics ``predict`` was asked for."""

    def __init__(self):
        super().__init__()
        self.ens = DeepEnsemble([SegDepth(False) for _ in range(3)], vectorize=False)
        self.asked: list = []

    def predict(self, x, return_members=False, statistics=None):
        self.asked.append(statistics)
        return self.ens.predict(x, return_members, statistics)


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": torch.randn(3, H, W, generator=torch.Generator().manual_seed(i)),
                "index": i}


def test_teacher_cache_computes_only_its_targets():
    spy = Spy()
    cache = TeacherCache(spy, Images(), targets=("uncertainty",), batch_size=2,
                         dtype=torch.float32)
    assert spy.asked == [["uncertainty"], ["uncertainty"]]
    full = TeacherCache(spy.ens, Images(), targets=("probs", "uncertainty"), batch_size=2,
                        dtype=torch.float32)
    torch.testing.assert_close(cache.targets["uncertainty"], full.targets["uncertainty"])

    class OldStyle(nn.Module):  # a predict without statistics= still works (everything computed)
        def __init__(self, ens):
            super().__init__()
            self.ens = ens

        def predict(self, x):
            return self.ens.predict(x)

    old = TeacherCache(OldStyle(spy.ens), Images(), targets=("uncertainty",), batch_size=2,
                       dtype=torch.float32)
    torch.testing.assert_close(old.targets["uncertainty"], full.targets["uncertainty"])


# ----------------------------------------------------------------------------- no work twice
def test_detection_metrics_share_one_sort_and_equal_the_three_functions():
    from minikd import metrics

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (3, 9, 11), generator=g).float() / 20  # many ties
    positives = torch.rand(3, 9, 11, generator=g) < scores * 0.8
    valid = torch.rand(3, 9, 11, generator=g) > 0.2
    got = metrics.detection_metrics(scores, positives, valid)
    assert got == {"auroc": metrics.auroc(scores, positives, valid),
                   "ap": metrics.average_precision(scores, positives, valid),
                   "fpr95": metrics.fpr_at_95_tpr(scores, positives, valid)}
    with pytest.warns(UserWarning, match="0 positives"):
        nan = metrics.detection_metrics(scores, torch.zeros_like(positives))
    assert all(math.isnan(v) for v in nan.values()) and sorted(nan) == ["ap", "auroc", "fpr95"]


def test_evaluate_asks_an_ensemble_only_for_what_it_scores():
    from torch.utils.data import DataLoader

    from minikd.training import evaluate

    g = torch.Generator().manual_seed(1)
    items = [{"image": torch.randn(3, H, W, generator=g),
              "mask": torch.randint(0, C, (H, W), generator=g)} for _ in range(4)]
    loader = DataLoader(items, batch_size=2)
    spy = Spy()
    res = evaluate(spy, loader, C, device="cpu")
    assert spy.asked and all("mutual_info" not in a and "entropy" not in a for a in spy.asked)
    assert "uncertainty" in spy.asked[0]
    full = evaluate(spy.ens, loader, C, device="cpu")
    assert res == full
    evaluate(spy, loader, C, device="cpu", with_uncertainty=False)
    assert "uncertainty" not in spy.asked[-1]


def test_sub_ensemble_forward_streams_and_backpropagates():
    """In eval mode DeepSubEnsemble.forward goes through StreamingStatistics with gradients on:
    its in-place shortcuts must not break autograd."""
    sub = DeepSubEnsemble(nn.Conv2d(3, 8, 1), lambda: nn.Conv2d(8, C, 1), n_heads=3).eval()
    acc = StreamingStatistics()  # every statistic, including the in-place entropy path
    x = torch.randn(B, 3, H, W)
    feats = sub.trunk(x)
    for head in sub.heads:
        acc.update(head(feats))
    out = acc.compute()
    (out["probs"].sum() + out["uncertainty"].sum() + out["mutual_info"].sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sub.parameters())
    sub.zero_grad()
    sub(x)["logits"].sum().backward()
    assert sub.heads[0].weight.grad is not None
