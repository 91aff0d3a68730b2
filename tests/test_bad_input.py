"""Issue 15: bad input fails early with a message that names the argument, what was received and
what to do; never a silent wrong result (NaN, probabilities that do not sum to 1) or a deep torch
error. Valid input, including float16 probabilities and uint8 labels, still works."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minikd import ensembles, losses, metrics, models, training

B, C, H, W = 2, 4, 4, 4
SCRIPTS = Path(__file__).resolve().parents[1] / "data_scripts"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(seed: int = 0, shape: tuple[int, ...] = (B, C, H, W)) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)) * 3


def _probs(seed: int = 0) -> torch.Tensor:
    return _logits(seed).softmax(1)


def _labels(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, C, (B, H, W), generator=_gen(seed))


def _members(m: int = 3) -> torch.Tensor:
    return torch.stack([_probs(10 + i) for i in range(m)])  # [M, B, C, H, W]


# ------------------------------------------------------------------- shared checks (metrics)
def test_check_labels_rejects_floats_and_out_of_range():
    with pytest.raises(TypeError, match=r"labels must be an integer tensor.*float32.*\.long\(\)"):
        metrics.check_labels(_labels().float(), C)
    with pytest.raises(ValueError, match=r"labels contain \[-1, 37\]; expected 0\.\.3 or 255"):
        metrics.check_labels(torch.tensor([0, 37, -1, 255]), C)
    with pytest.raises(ValueError, match=r"pred contain \[255\]; expected 0\.\.3\. "):
        metrics.check_labels(torch.tensor([0, 255]), C, None, name="pred")
    metrics.check_labels(_labels().to(torch.uint8), C)  # any integer dtype passes
    metrics.check_labels(torch.tensor([0, 3, 255], dtype=torch.int32), C)


def test_check_probabilities_messages_and_tolerances():
    with pytest.raises(ValueError, match=r"contain negative values: got values in \[.*sums over "
                                         r"dim 1 in .*Did you pass logits\? Apply \.softmax\(1\)"):
        metrics.check_probabilities(_logits())
    with pytest.raises(ValueError, match=r"do not sum to 1 over dim 1: got values in \[0\.9, 0\.9\]"
                                         r".*sums over dim 1 in \[3\.6, 3\.6\]"):
        metrics.check_probabilities(torch.full((B, C, H, W), 0.9))
    nan = _probs().clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="contain NaN or inf"):
        metrics.check_probabilities(nan)
    with pytest.raises(TypeError, match="floating-point tensor of probabilities"):
        metrics.check_probabilities(_labels())
    metrics.check_probabilities(_probs())
    metrics.check_probabilities(_probs().half())  # a TeacherCache's float16
    metrics.check_probabilities(_probs().bfloat16())
    padded = _probs().clone()
    padded[:, :, 0] = 0.0  # crop padding: all-zero probabilities, left out by `valid`
    metrics.check_probabilities(padded, valid=padded.sum(1) > 0.5)
    with pytest.raises(ValueError, match="do not sum to 1"):
        metrics.check_probabilities(padded)


# ------------------------------------------------------------------- silent wrong results
def test_ensemble_kl_loss_rejects_teacher_logits():
    # before: NaN
    with pytest.raises(ValueError, match=r"teacher_probs contain negative values.*softmax\(1\)"):
        losses.ensemble_kl_loss(_logits(0), _logits(1))


def test_ensemble_kl_loss_accepts_fp16_and_skips_ignored_padding():
    probs = _probs(1).half()
    value = losses.ensemble_kl_loss(_logits(0), probs)
    assert torch.isfinite(value)
    padded = probs.clone()
    padded[:, :, 0] = 0
    ignore = torch.zeros(B, H, W, dtype=torch.bool)
    ignore[:, 0] = True
    assert torch.isfinite(losses.ensemble_kl_loss(_logits(0), padded, ignore))


def test_ece_rejects_unnormalised_probabilities():
    # before: 0.69 for all-0.9 "probabilities"
    with pytest.raises(ValueError, match=r"probs do not sum to 1.*\[3\.6, 3\.6\].*softmax\(1\)"):
        metrics.ece(torch.full((B, C, H, W), 0.9), _labels())


def test_ece_accepts_fp16_probs_and_uint8_labels():
    ref = metrics.ece(_probs(), _labels())
    assert metrics.ece(_probs().half(), _labels().to(torch.uint8)) == pytest.approx(ref, abs=1e-3)


def test_entropy_rejects_logits_and_respects_dim():
    # before: mostly NaN
    with pytest.raises(ValueError, match=r"probs contain negative values.*softmax\(1\)"):
        metrics.entropy(_logits())
    p = _probs()[0]  # [C, H, W]
    with pytest.raises(ValueError, match=r"do not sum to 1 over dim 1.*softmax\(1\)"):
        metrics.entropy(p, dim=1)  # wrong dim: the rows do not sum to 1
    torch.testing.assert_close(metrics.entropy(p, dim=0), metrics.entropy(p[None])[0])
    assert torch.isfinite(metrics.entropy(_probs().half())).all()


def test_mutual_information_rejects_logits_accepts_fp16():
    with pytest.raises(ValueError, match=r"member_probs contain negative.*over dim 2.*softmax\(2\)"):
        metrics.mutual_information(torch.randn(3, B, C, H, W))
    mi = metrics.mutual_information(_members().half())
    assert mi.shape == (B, H, W) and bool((mi >= 0).all())


def test_weighted_fusion_rejects_member_logits():
    # before: "probabilities" that do not sum to 1
    logits = torch.stack([_logits(i) for i in range(3)])
    with pytest.raises(ValueError, match=r"member_probs contain negative.*dim 2.*softmax\(2\)"):
        ensembles.weighted_fusion(logits, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"member_probs do not sum to 1 over dim 2"):
        ensembles.weighted_fusion(torch.full((3, B, C, H, W), 0.5), [1.0, 2.0, 1.0])


def test_weighted_fusion_accepts_fp16_members():
    fused = ensembles.weighted_fusion(_members().half(), [1.0, 2.0, 1.0])
    assert fused.dtype == torch.float16
    torch.testing.assert_close(fused.float().sum(1), torch.ones(B, H, W), atol=1e-2, rtol=0)


def test_other_probability_consumers_check_their_input():
    logits = torch.stack([_logits(i) for i in range(3)])
    with pytest.raises(ValueError, match="member_probs contain negative"):
        ensembles.confidence_weights(logits)
    grid = ensembles.weight_grid(3, range(2))
    with pytest.raises(ValueError, match="member_probs contain negative"):
        ensembles.ensemble_weight_confusions(logits, _labels(), grid, C)
    with pytest.raises(ValueError, match="member_probs contain negative"):
        ensembles.search_ensemble_weights(logits, _labels(), C, grid=grid)
    # valid input, float16 and uint8 labels included
    best = ensembles.search_ensemble_weights(_members().half(), _labels().to(torch.uint8), C,
                                             grid=grid)
    assert best["weights"].shape == (3,)
    assert ensembles.confidence_weights(_members().half()).shape == (3, B, H, W)


def test_fuse_teacher_caches_checks_the_fused_output():
    index = torch.arange(B)
    caches = [ensembles.TeacherCache._from_state({"targets": {"probs": _probs(i).half()},
                                                  "dataset_index": index}) for i in range(2)]
    with pytest.raises(ValueError, match=r"fuse\(\.\.\.\)'s output contain negative.*softmax"):
        ensembles.fuse_teacher_caches(caches, lambda p: p.mean(0).log())  # log-probs by mistake
    fused = ensembles.fuse_teacher_caches(caches, lambda p: ensembles.weighted_fusion(p, [1, 1]))
    assert fused.targets["logits"].shape == (B, C, H, W)


# ------------------------------------------------------------------- unclear errors: losses
@pytest.mark.parametrize("bad", ["uint8", "out_of_range", "negative"])
def test_cross_entropy_labels(bad):
    logits = _logits()
    if bad == "uint8":  # before: "expected scalar type Long but found Byte"; now accepted
        labels = _labels().to(torch.uint8)
        labels[0, 0, 0] = 255
        ref = losses.cross_entropy(logits, labels.long())
        torch.testing.assert_close(losses.cross_entropy(logits, labels), ref)
        return
    labels = _labels()
    labels[0, 0, 0] = 37 if bad == "out_of_range" else -1
    value = 37 if bad == "out_of_range" else -1
    with pytest.raises(ValueError, match=rf"labels contain \[{value}\]; expected 0\.\.3 or 255 "
                                         r"\(ignore\)\. Did you pass Cityscapes labelIds"):
        losses.cross_entropy(logits, labels)


def test_cross_entropy_rejects_float_labels():
    with pytest.raises(TypeError, match=r"labels must be an integer tensor.*labels\.long\(\)"):
        losses.cross_entropy(_logits(), _labels().float())


def test_distillation_loss_bad_labels_and_uint8():
    fn = losses.DistillationLoss(2.0, lam=0.1)
    batch = {"mask": _labels(), "teacher_logits": _logits(1)}
    ref, _ = fn(_logits(0), batch)
    loss, _ = fn(_logits(0), {**batch, "mask": _labels().to(torch.uint8)})
    torch.testing.assert_close(loss, ref)
    bad = _labels()
    bad[1, 2, 3] = 37
    with pytest.raises(ValueError, match=r"labels contain \[37\]; expected 0\.\.3 or 255"):
        fn(_logits(0), {**batch, "mask": bad})


def test_distillation_loss_without_mask():
    fn = losses.DistillationLoss(1.0, lam=0.1)
    with pytest.raises(ValueError, match=r"DistillationLoss needs batch\['mask'\], but the batch "
                                         r"has keys \['teacher_logits'\]\. It is the labels"):
        fn(_logits(0), {"teacher_logits": _logits(1)})


def test_distillation_loss_teacher_probs_checked_fp16_ok():
    fn = losses.DistillationLoss(1.0, lam=0.1)
    with pytest.raises(ValueError, match=r"batch\['teacher_probs'\] contain negative.*softmax"):
        fn(_logits(0), {"mask": _labels(), "teacher_probs": _logits(1)})
    loss, _ = fn(_logits(0), {"mask": _labels(), "teacher_probs": _probs(1).half()})
    assert torch.isfinite(loss)


def test_dudes_loss_needs_the_students_dict():
    fn = losses.DUDESLoss()
    batch = {"mask": _labels(), "teacher_unc": torch.rand(B, H, W)}
    with pytest.raises(ValueError, match=r"DUDESLoss needs the output dict of a "
                                         r"models\.DUDESStudent with keys \['logits', "
                                         r"'uncertainty'\], but the model returned a Tensor of "
                                         r"shape \(2, 4, 4, 4\)\. Wrap the segmenter"):
        fn(_logits(), batch)
    with pytest.raises(ValueError, match=r"returned a dict with keys \['logits'\]"):
        fn({"logits": _logits()}, batch)
    with pytest.raises(ValueError, match=r"DUDESLoss needs batch\['mask'\]"):
        fn({"logits": _logits(), "uncertainty": torch.rand(B, H, W)}, {"teacher_unc": batch[
            "teacher_unc"]})
    loss, _ = fn({"logits": _logits(), "uncertainty": torch.rand(B, H, W)},
                 {**batch, "mask": _labels().to(torch.uint8)})
    assert torch.isfinite(loss)


def _emu_batch(probs: torch.Tensor) -> dict:
    return {"mask": _labels(), "depth": torch.rand(B, H, W) + 0.5, "teacher_probs": probs,
            "teacher_depth_var": torch.rand(B, H, W)}


def _emu_outputs() -> dict:
    return {"logits": _logits(), "depth": torch.rand(B, H, W) + 0.5,
            "depth_var": torch.rand(B, H, W) + 0.1}


def test_emuformer_loss_needs_the_students_dict_and_depth():
    fn = losses.EMUFormerLoss()
    with pytest.raises(ValueError, match=r"EMUFormerLoss needs the output dict of a "
                                         r"models\.SegDepthFormer with keys \['logits', 'depth', "
                                         r"'depth_var'\], but the model returned a Tensor"):
        fn(_logits(), _emu_batch(_probs(1)))
    batch = _emu_batch(_probs(1))
    del batch["depth"]
    with pytest.raises(ValueError, match=r"EMUFormerLoss needs batch\['depth'\].*ground-truth "
                                         r"depth"):
        fn(_emu_outputs(), batch)
    with pytest.raises(ValueError, match=r"teacher_probs contain negative"):
        fn(_emu_outputs(), _emu_batch(_logits(1)))
    loss, _ = fn(_emu_outputs(), _emu_batch(_probs(1).half()))  # cached float16 passes
    assert torch.isfinite(loss)


def test_class_wise_uncertainty_loss_needs_the_students_dict():
    fn = losses.ClassWiseUncertaintyLoss()
    batch = {"mask": _labels(), "teacher_unc": torch.rand(B, C, H, W)}
    with pytest.raises(ValueError, match=r"ClassWiseUncertaintyLoss needs the output dict of a "
                                         r"models\.ClassWiseUncertaintyStudent with keys "
                                         r"\['logits', 'class_uncertainty'\]"):
        fn({"logits": _logits(), "uncertainty": torch.rand(B, H, W)}, batch)
    loss, _ = fn({"logits": _logits(), "class_uncertainty": torch.rand(B, C, H, W)}, batch)
    assert torch.isfinite(loss)


def test_ifvd_labels_use_the_shared_check():
    feats = torch.randn(B, 3, H, W)
    with pytest.raises(ValueError, match=r"labels contain \[7\]; expected 0\.\.2 or 255"):
        losses.ifvd_loss(feats, feats, torch.full((B, H, W), 7), 3)


# ------------------------------------------------------------------- unclear errors: metrics
def test_class_wise_uncertainty_float_mask():
    unc, pred = torch.rand(B, H, W, generator=_gen(0)), _labels()
    keep = _labels(1) != 0
    ref = metrics.class_wise_uncertainty(unc, pred, C, valid=keep)
    # before: IndexError; a 0/1 float mask is now converted like in every other metric
    torch.testing.assert_close(metrics.class_wise_uncertainty(unc, pred, C, valid=keep.float()),
                               ref, equal_nan=True)
    with pytest.raises(ValueError, match=r"valid has dtype torch\.float32 and holds \[0\.5\]; "
                                         r"expected a bool mask"):
        metrics.class_wise_uncertainty(unc, pred, C, valid=torch.full((B, H, W), 0.5))


def test_valid_mask_handling_is_shared():
    scores, positives = torch.rand(B, H, W, generator=_gen(0)), _labels() == 0
    keep = _labels(1) != 0
    ref = metrics.auroc(scores, positives, keep)
    assert metrics.auroc(scores, positives, keep.to(torch.uint8)) == pytest.approx(ref)
    for fn in (metrics.auroc, metrics.average_precision, metrics.fpr_at_95_tpr):
        with pytest.raises(ValueError, match="valid has dtype torch.float32 and holds"):
            fn(scores, positives, torch.full((B, H, W), 0.5))
    target = torch.rand(B, H, W) + 0.5
    with pytest.raises(ValueError, match="valid has dtype torch.float32 and holds"):
        metrics.depth_metrics(target, target, torch.full((B, H, W), 0.5))
    assert metrics.depth_metrics(target, target, keep.float())["rmse"] == 0.0
    with pytest.raises(ValueError, match=r"shape mismatch: uncertainty \(2, 4, 4\), valid"):
        metrics.class_wise_uncertainty(scores, _labels(), C, valid=keep[0])


def test_uncertainty_accuracy_rejects_float_predictions():
    with pytest.raises(TypeError, match=r"pred must be an integer tensor.*argmax\(1\)"):
        metrics.uncertainty_accuracy(torch.rand(B, H, W), torch.rand(B, H, W), _labels())


# ------------------------------------------------------------------- unclear errors: ensembles
def test_dudes_uncertainty_checks_its_input():
    members, pred = _members(), _members().mean(0).argmax(1)
    with pytest.raises(ValueError, match=r"member_probs has shape \(2, 4, 4, 4\); expected "
                                         r"\[M, B, C, H, W\].*unsqueeze\(0\)"):
        ensembles.dudes_uncertainty(_probs(), pred)
    bad = pred.clone()
    bad[0, 0, 0] = 255
    with pytest.raises(ValueError, match=r"pred contain \[255\]; expected 0\.\.3\."):
        ensembles.dudes_uncertainty(members, bad)
    with pytest.raises(ValueError, match=r"pred has shape \(4, 4\); expected \[B, H, W\]"):
        ensembles.dudes_uncertainty(members, pred[0])
    with pytest.raises(ValueError, match="member_probs contain negative"):
        ensembles.dudes_uncertainty(torch.randn(3, B, C, H, W), pred)
    assert ensembles.dudes_uncertainty(members.half(), pred.int()).shape == (B, H, W)


def test_weighted_fusion_names_members_with_other_class_counts():
    members = [_probs(0), _probs(1)[:, :3].softmax(1), _probs(2)]
    with pytest.raises(ValueError, match=r"member 0: \(2, 4, 4, 4\) \(4 classes\); member 1: "
                                         r"\(2, 3, 4, 4\) \(3 classes\).*num_classes"):
        ensembles.weighted_fusion(members, [1.0, 1.0, 1.0])


# ------------------------------------------------------------------- unclear errors: models
def test_unet_num_classes_checked():
    with pytest.raises(ValueError, match=r"UNet needs num_classes, a positive int.*got 0"):
        models.unet_family("M128/4", 0)
    with pytest.raises(ValueError, match=r"UNet needs num_classes, a positive int.*got 2\.0"):
        models.UNet(3, 32, num_classes=2.0)
    with pytest.raises(ValueError, match=r"build_segmenter needs num_classes.*got 0"):
        models.build_segmenter("Unet", "resnet18", 0)
    with pytest.raises(ValueError, match=r"light_unet needs num_classes.*got -1"):
        models.light_unet("tu-resnet10t", -1)
    assert models.unet_family("M128/4", 3).eval()(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 16, 16)


class _NotWeights:
    """A pickled Python object: torch.load(weights_only=True) refuses it."""


def test_load_encoder_weights_never_suggests_unsafe_loading(tmp_path):
    encoder = nn.Conv2d(3, 4, 1)
    path = tmp_path / "encoder.pt"
    torch.save({"weight": _NotWeights()}, path)
    with pytest.raises(ValueError, match=r"encoder\.pt' is not a readable file of encoder "
                                         r"weights \(UnpicklingError: .*never unpickles\)\. Pass a "
                                         r"\.safetensors file or a plain state dict") as info:
        models.load_encoder_weights(encoder, path)
    assert "False" not in str(info.value) and info.value.__cause__ is None
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="is not a readable file of encoder weights"):
        models.load_encoder_weights(encoder, garbage)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match=r"holds a Tensor, not a state dict"):
        models.load_encoder_weights(encoder, tmp_path / "tensor.pt")
    torch.save(nn.Conv2d(3, 4, 1).state_dict(), tmp_path / "good.pt")
    models.load_encoder_weights(encoder, tmp_path / "good.pt")


def test_checkpoint_and_cache_errors_never_suggest_unsafe_loading(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"weight": _NotWeights()}, path)
    with pytest.raises(training.CheckpointError, match="never unpickles") as info:
        training.load_checkpoint(path)
    assert "weights_only" not in str(info.value)
    with pytest.raises(ValueError, match="not a readable minikd teacher cache.*never "
                                         "unpickles") as info:
        ensembles.TeacherCache.load(path)
    assert "weights_only" not in str(info.value)


# ------------------------------------------------------------------- stale temporary files
def test_save_removes_stale_temporaries_of_the_same_target_only(tmp_path):
    target = tmp_path / "last.pt"
    stale = tmp_path / ".last.pt.k3x_9ab2.tmp"  # what a killed _atomic_write leaves behind
    stale.write_bytes(b"half a checkpoint")
    others = [tmp_path / ".best.pt.k3x_9ab2.tmp",  # another target's temporary
              tmp_path / ".last.pt.tmp",  # not a mkstemp name
              tmp_path / ".last.pt.k3x_9ab2.tmp.keep", tmp_path / "last.pt.bak",
              tmp_path / "notes.tmp"]
    for p in others:
        p.write_bytes(b"keep me")
    training._atomic_write(target, lambda f: torch.save({"step": 1}, f))
    assert not stale.exists()
    assert all(p.read_bytes() == b"keep me" for p in others)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name] + [p.name for p in others])


def test_teacher_cache_save_removes_its_stale_temporaries(tmp_path):
    path = tmp_path / "cache.pt"
    old_style = tmp_path / "cache.ptab12cd34.tmp"  # older minikd wrote caches through these
    new_style = tmp_path / ".cache.pt.ab12cd34.tmp"
    other = tmp_path / ".other.pt.ab12cd34.tmp"
    for p in (old_style, new_style, other):
        p.write_bytes(b"x")
    cache = ensembles.TeacherCache._from_state({"targets": {"probs": _probs().half()},
                                                "dataset_index": torch.arange(B)})
    cache.save(path)
    assert not old_style.exists() and not new_style.exists() and other.exists()
    assert torch.equal(ensembles.TeacherCache.load(path).targets["probs"], cache.targets["probs"])


# ------------------------------------------------------------------- data scripts
def test_prepare_nyuv2_pickled_arrays_exit_2_with_one_line(tmp_path):
    npz = tmp_path / "nyu.npz"
    np.savez(npz, images=np.array([object()], dtype=object), depths=np.zeros((1, 2, 2)),
             labels40=np.zeros((1, 2, 2), np.uint8), train_idx=np.array([0]),
             test_idx=np.array([0]))
    cmd = [sys.executable, str(SCRIPTS / "prepare_nyuv2.py"), "--npz", str(npz),
           "--out", str(tmp_path / "nyu")]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "array 'images' cannot be read as plain numbers" in done.stderr
    assert "pickled data is never loaded" in done.stderr and "allow_pickle" not in done.stderr
    assert not (tmp_path / "nyu").exists()


def test_depth_predictive_variance_checks_shapes():
    depth = torch.rand(3, B, H, W) + 1
    with pytest.raises(ValueError, match=r"got depth \(3, 2, 4, 4\) and depth_var \(2, 4, 4\); "
                                         r"expected the members' depth means \[M, B, H, W\]"):
        ensembles.depth_predictive_variance(depth, torch.rand(B, H, W))
    with pytest.raises(ValueError, match=r"got depth \(2, 4, 4\); expected"):
        ensembles.depth_predictive_variance(depth[0])
    assert ensembles.depth_predictive_variance(depth, torch.rand(3, B, H, W)).shape == (B, H, W)
