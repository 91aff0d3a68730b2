"""Tests for minikd.training: schedule, learning rates, exact resume, bad checkpoints, NaN stops,
evaluate against metrics.py, ensembles, grid search and result files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _train_worker import NUM_CLASSES, TinySeg, ToyDicts, ce_loss, make_loader
from torch import nn
from torch.utils.data import DataLoader

from minikd import metrics, training
from minikd.training import (
    CKPT_NAME,
    CheckpointError,
    build_optimizer,
    evaluate,
    fit,
    format_mean_std,
    grid_search,
    init_distributed,
    is_main_process,
    load_checkpoint,
    save_results,
    set_seed,
    train_ensemble,
)

HERE = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **kw) -> TinySeg:
    torch.manual_seed(seed)
    return TinySeg(**kw)


def _fit(model, loader=None, **kw):
    kw = {"iterations": 8, "lr": 0.05, "seed": 1, "progress": False, "device": "cpu", **kw}
    return fit(model, loader or make_loader(), kw.pop("loss_fn", ce_loss), **kw)


def _assert_same_weights(a: nn.Module | dict, b: nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


# ----------------------------------------------------------------------------- optimizer / schedule
def test_decoder_learns_ten_times_faster_and_poly_decay():
    model = _model()
    opt = build_optimizer(model, lr=0.02)
    enc, dec = opt.param_groups
    assert (enc["name"], enc["lr"], dec["name"], dec["lr"]) == ("encoder", 0.02, "decoder", 0.2)
    assert {id(p) for p in enc["params"]} == {id(p) for p in model.encoder.parameters()}
    assert (enc["momentum"], enc["weight_decay"]) == (0.9, 5e-4)  # DUDES §4
    history = _fit(model, iterations=5, lr=0.1)
    expected = [0.1 * (1 - i / 5) ** 0.9 for i in range(5)]
    assert history["lr"] == pytest.approx(expected)
    assert history["step"] == [1, 2, 3, 4, 5]
    assert len(history["terms"]["ce"]) == 5 and history["loss"] == history["terms"]["ce"]


def test_model_without_encoder_trains_everything_at_lr():
    opt = build_optimizer(nn.Conv2d(3, 2, 1), "adamw", lr=1e-3)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="optimizer='adam'"):
        build_optimizer(nn.Conv2d(3, 2, 1), "adam")


def test_fit_lowers_the_loss():
    model = _model(dropout=0.0)
    h = _fit(model, iterations=40, lr=0.1)
    assert sum(h["loss"][-5:]) / 5 < 0.7 * sum(h["loss"][:5]) / 5
    assert all(r > 0 for r in h["images_per_s"])


def test_fit_rejects_bad_loss_and_batches():
    with pytest.raises(ValueError, match="scalar Tensor"):
        _fit(_model(), loss_fn=lambda out, b: F.cross_entropy(out, b["mask"], reduction="none"))
    tuples = DataLoader(torch.utils.data.TensorDataset(torch.rand(4, 3, 8, 16)), batch_size=2)
    with pytest.raises(ValueError, match="'image' key"):
        _fit(_model(), tuples)
    with pytest.raises(ValueError, match="iterations=0"):
        _fit(_model(), iterations=0)


def test_nan_loss_stops_with_step_and_terms():
    calls = {"n": 0}

    def loss_fn(out, batch):
        calls["n"] += 1
        ce = F.cross_entropy(out, batch["mask"])
        bad = ce * float("nan") if calls["n"] == 3 else ce
        return bad, {"ce": ce.detach(), "kd": bad.detach()}

    model = _model()
    with pytest.raises(FloatingPointError, match=r"step 3 of 8.*ce=.*kd=nan"):
        _fit(model, loss_fn=loss_fn)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # stopped before the step


def test_amp_bf16_autocast_on_cpu_and_distributed_needs_a_group():
    h = _fit(_model(), iterations=2, amp="bf16")
    assert all(math.isfinite(v) for v in h["loss"])
    with pytest.raises(ValueError, match="fp16"):
        _fit(_model(), iterations=2, amp="fp16")
    assert init_distributed() == (0, 1) and is_main_process()  # not under torchrun: no-op
    with pytest.raises(ValueError, match="init_distributed"):
        _fit(_model(), iterations=2, distributed=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_precision_and_channels_last(tmp_path):
    model = _model()
    h = fit(model, make_loader(), ce_loss, iterations=6, progress=False, device="cuda",
            ckpt_dir=tmp_path, ckpt_every=2, log_every=4)
    assert all(math.isfinite(v) for v in h["loss"]) and len(h["loss"]) == 6
    w = model.encoder[0].weight
    assert w.is_cuda and w.is_contiguous(memory_format=torch.channels_last)
    res = evaluate(model, DataLoader(ToyDicts(4, augment=False), batch_size=2), NUM_CLASSES)
    assert 0 <= res["miou"] <= 1


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_is_complete_and_loads_with_weights_only(tmp_path):
    _fit(_model(), ckpt_dir=tmp_path, ckpt_every=3)
    ckpt = torch.load(tmp_path / CKPT_NAME, weights_only=True)
    assert ckpt["step"] == 8 and len(ckpt["history"]["loss"]) == 8
    for key in ("model", "optimizer", "scheduler", "ranks"):
        assert key in ckpt
    assert set(ckpt["ranks"][0]["rng"]) >= {"python", "numpy", "torch"}
    assert [p.name for p in tmp_path.iterdir()] == [CKPT_NAME]  # no temporary file left


def test_finished_run_loads_its_weights_without_training(tmp_path, capsys):
    trained = _model()
    h1 = _fit(trained, ckpt_dir=tmp_path)
    fresh = _model(seed=5)
    h2 = _fit(fresh, ckpt_dir=tmp_path)
    _assert_same_weights(trained, fresh)
    assert h2["loss"] == h1["loss"] and h2["resumed_from"] == 8
    assert "nothing to train" in capsys.readouterr().out


@pytest.mark.parametrize(("num_workers", "ckpt_every", "crash_at", "saved"), [
    (0, 3, 8, 6),   # checkpoint mid-epoch (4 batches an epoch: step 6 = epoch 1, batch 2)
    (0, 4, 10, 8),  # checkpoint at the end of an epoch
    (2, 3, 8, 6),   # worker processes: their seeds must be replayed too
])
def test_resume_after_crash_is_bit_identical(tmp_path, num_workers, ckpt_every, crash_at, saved):
    """Crash (an exception) after a checkpoint, resume in a new call, compare with no crash."""
    kw = {"iterations": 11, "ckpt_every": ckpt_every}
    reference = _model()
    h_ref = _fit(reference, make_loader(num_workers=num_workers), **kw)

    def crashing(out, batch, n=[0]):  # noqa: B006 - counts calls
        n[0] += 1
        if n[0] == crash_at:
            raise KeyboardInterrupt
        return ce_loss(out, batch)

    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), make_loader(num_workers=num_workers), ckpt_dir=tmp_path,
             loss_fn=crashing, **kw)
    assert load_checkpoint(tmp_path / CKPT_NAME)["step"] == saved
    resumed = _model(seed=99)  # another init: everything must come from the checkpoint
    h = _fit(resumed, make_loader(num_workers=num_workers), ckpt_dir=tmp_path, **kw)
    _assert_same_weights(reference, resumed)
    assert h["loss"] == h_ref["loss"] and h["resumed_from"] == saved


@pytest.mark.slow
def test_sigkilled_training_resumes_to_identical_weights(tmp_path, monkeypatch):
    """Kill a training process (SIGKILL) after a checkpoint; the resumed run ends identical."""
    script, out = HERE / "_train_worker.py", tmp_path / "final.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, str(script), "--out", str(out), "--ckpt-dir", str(tmp_path / "ckpt"),
           "--iterations", "24", "--ckpt-every", "5"]
    proc = subprocess.Popen([*cmd, "--sleep", "0.2"], env=env, stdout=subprocess.DEVNULL)
    ckpt = tmp_path / "ckpt" / CKPT_NAME
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
    step = load_checkpoint(ckpt)["step"]
    assert 0 < step < 24 and not out.exists()
    # resume to the end, and an uninterrupted run, here (same single thread, same kernels)
    import _train_worker

    monkeypatch.setattr(sys, "argv", cmd[1:])
    _train_worker.main()
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(tmp_path / "ref.pt")])
    _train_worker.main()
    _assert_same_weights(torch.load(out, weights_only=True),
                         torch.load(tmp_path / "ref.pt", weights_only=True))


# Garbage bytes can look like a pickle of an unknown protocol; torch warns before failing.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unusable_checkpoints_raise_a_clear_error(tmp_path):
    path = tmp_path / CKPT_NAME
    _fit(_model(), ckpt_dir=tmp_path, iterations=3)
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    for data in (good[: len(good) // 2], rng.bytes(1000)):  # truncated, random bytes
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{CKPT_NAME} is not a readable checkpoint"):
            _fit(_model(), ckpt_dir=tmp_path, iterations=3)
    # Garbage makes torch's unpickler raise many kinds of error (IndexError, EOFError, ...);
    # every one must come out as the same clear CheckpointError. (os.urandom once hit a case
    # that escaped as IndexError.)
    for _ in range(300):
        path.write_bytes(rng.bytes(int(rng.integers(1, 2000))))
        with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
            load_checkpoint(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a minikd checkpoint"):
        _fit(_model(), ckpt_dir=tmp_path, iterations=3)
    path.write_bytes(good)
    with pytest.raises(CheckpointError, match=r"model state does not fit.*size mismatch"):
        _fit(_model(width=6), ckpt_dir=tmp_path, iterations=3)
    with pytest.raises(CheckpointError, match="run of 3 iterations, this one asks for 4"):
        _fit(_model(), ckpt_dir=tmp_path, iterations=4)


def test_validation_is_recorded_and_does_not_change_training():
    val = DataLoader(ToyDicts(4, augment=False, seed=1), batch_size=2)
    plain, validated = _model(), _model()
    _fit(plain)
    h = _fit(validated, val_loader=val, val_every=3)
    _assert_same_weights(plain, validated)
    assert [v["step"] for v in h["val"]] == [3, 6, 8]
    assert 0 <= h["val"][-1]["miou"] <= 1 and len(h["val"][-1]["iou"]) == NUM_CLASSES


def test_set_seed_repeats_every_rng():
    import random

    import numpy as np

    set_seed(3)
    a = (random.random(), np.random.rand(), torch.rand(2))
    set_seed(3)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    with pytest.raises(ValueError, match="seed=-1"):
        set_seed(-1)


# ----------------------------------------------------------------------------- evaluate
class FixedModel(nn.Module):
    """Deterministic outputs derived from the image: logits, uncertainty and depth."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        logits = self.w * x[:, :NUM_CLASSES]
        return {"logits": logits, "uncertainty": x[:, 0] * 0.5 + x[:, 1] * 0.3,
                "depth": 1.0 + 9.0 * x[:, 2]}


def _eval_data(n: int = 6, ood: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, *(8, 16), generator=g)
    masks = torch.randint(0, NUM_CLASSES, (n, 8, 16), generator=g)
    masks[:, :2, :3] = 255
    depth = 1.0 + 9.0 * torch.rand(n, 8, 16, generator=g)
    depth[:, -1] = 0.0  # invalid
    items = [{"image": images[i], "mask": masks[i], "depth": depth[i]} for i in range(n)]
    if ood:
        for i, item in enumerate(items):
            item["ood_mask"] = torch.zeros(8, 16, dtype=torch.bool)
            item["ood_mask"][3:5, 2 + i:6 + i] = True
            item["mask"][item["ood_mask"]] = 255
    return items


def test_evaluate_equals_metrics_on_the_whole_set():
    items = _eval_data()
    model = FixedModel()
    res = evaluate(model, DataLoader(items, batch_size=4), NUM_CLASSES, device="cpu",
                   removal_fractions=[0.0, 0.25, 0.5])
    x = torch.stack([i["image"] for i in items])
    labels = torch.stack([i["mask"] for i in items])
    out = model(x)
    probs, unc = out["logits"].softmax(1), out["uncertainty"]
    pred = probs.argmax(1)
    meter = metrics.SegmentationMeter(NUM_CLASSES)
    meter.update(pred, labels)
    assert res["miou"] == pytest.approx(meter.compute()["miou"])
    assert res["ece"] == pytest.approx(metrics.ece(probs, labels), abs=1e-9)
    ua = metrics.uncertainty_accuracy(unc, pred, labels)
    for k in ("p_accurate_certain", "p_uncertain_inaccurate", "pavpu"):
        assert res[k] == pytest.approx(ua[k])
    valid = labels != 255
    assert res["error_auroc"] == pytest.approx(metrics.auroc(unc, pred != labels, valid))
    assert res["error_ap"] == pytest.approx(metrics.average_precision(unc, pred != labels, valid))
    ood = torch.stack([i["ood_mask"] for i in items])
    assert res["ood_auroc"] == pytest.approx(metrics.auroc(unc, ood, ood | valid))
    cw = metrics.class_wise_uncertainty(unc, pred, NUM_CLASSES)
    assert res["class_uncertainty"] == pytest.approx(cw.tolist(), nan_ok=True)
    curve = metrics.removal_curve(unc, pred, labels, NUM_CLASSES, [0.0, 0.25, 0.5])
    assert res["removal_miou"] == pytest.approx(curve.tolist())
    depth = torch.stack([i["depth"] for i in items])
    dm = metrics.depth_metrics(out["depth"], depth, depth > 0)
    for k, v in dm.items():
        assert res[f"depth_{k}"] == pytest.approx(v)
    assert res["pixel_subsample_rate"] == 1.0


def test_evaluate_subsamples_pixels_deterministically():
    items = _eval_data(ood=False)
    loader = DataLoader(items, batch_size=2)
    a = evaluate(FixedModel(), loader, NUM_CLASSES, device="cpu", max_pixels=300)
    b = evaluate(FixedModel(), loader, NUM_CLASSES, device="cpu", max_pixels=300)
    full = evaluate(FixedModel(), loader, NUM_CLASSES, device="cpu")
    assert a["pixel_subsample_rate"] == pytest.approx(300 / (6 * 8 * 16))
    assert a["error_auroc"] == b["error_auroc"]
    assert a["error_auroc"] == pytest.approx(full["error_auroc"], abs=0.1)
    assert a["miou"] == full["miou"]  # exact metrics never subsample
    with pytest.raises(ValueError, match="ood=True"):
        evaluate(FixedModel(), loader, NUM_CLASSES, device="cpu", ood=True)


def test_evaluate_plain_model_and_ensemble():
    from minikd.ensembles import DeepEnsemble

    loader = DataLoader(_eval_data(ood=False), batch_size=3)
    model = _model()
    model.train()
    res = evaluate(model, loader, device="cpu")  # classes read from the logits
    assert model.training  # mode restored
    assert len(res["iou"]) == NUM_CLASSES and "error_auroc" not in res
    ens = evaluate(DeepEnsemble([_model(s) for s in range(3)]), loader, NUM_CLASSES,
                   device="cpu")
    assert 0.0 <= ens["error_auroc"] <= 1.0 and 0.0 <= ens["pavpu"] <= 1.0


# ----------------------------------------------------------------------------- ensembles
def test_train_ensemble_members_differ_only_by_seed():
    kw = {"iterations": 4, "lr": 0.05, "progress": False, "device": "cpu"}
    a = train_ensemble(TinySeg, 2, make_loader(), ce_loss, seeds=[10, 11], **kw)
    b, hist = train_ensemble(TinySeg, 2, make_loader(), ce_loss, seeds=[10, 11],
                             return_histories=True, **kw)
    for m, n in zip(a, b):
        _assert_same_weights(m, n)
    assert not torch.equal(a[0].decoder[1].weight, a[1].decoder[1].weight)
    assert hist[0]["loss"] != hist[1]["loss"]  # own init, data order and augmentation
    with pytest.raises(ValueError, match="3 distinct seeds"):
        train_ensemble(TinySeg, 3, make_loader(), ce_loss, seeds=[1, 1, 2], **kw)
    with pytest.raises(ValueError, match=r"\['seed'\]"):
        train_ensemble(TinySeg, 2, make_loader(), ce_loss, seed=3, **kw)


def test_train_ensemble_resumes_per_member(tmp_path):
    kw = {"iterations": 3, "progress": False, "device": "cpu", "ckpt_dir": tmp_path}
    first = train_ensemble(TinySeg, 2, make_loader(), ce_loss, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["member_0", "member_1"]
    again = train_ensemble(TinySeg, 2, make_loader(), ce_loss, **kw)
    for m, n in zip(first, again):
        _assert_same_weights(m, n)


@pytest.mark.filterwarnings("ignore:.*positives among")  # an untrained student errs everywhere
def test_with_library_models_and_toycity():
    data = pytest.importorskip("minikd.data")
    models = pytest.importorskip("minikd.models")
    size = (32, 64)
    train = DataLoader(data.ToyCity(4, size, transform=data.train_transforms(size)),
                       batch_size=2, shuffle=True)
    net = models.unet_family("M128/4", data.ToyCity.NUM_CLASSES)
    h = fit(net, train, lambda out, b: F.cross_entropy(out, b["mask"], ignore_index=255),
            iterations=3, progress=False, device="cpu", seed=0)
    assert all(math.isfinite(v) for v in h["loss"])
    enc, dec = build_optimizer(net).param_groups
    assert dec["lr"] == 10 * enc["lr"] and len(enc["params"]) > 0
    assert [id(p) for p in enc["params"]] == [id(p) for p in models.param_groups(net)[0]]
    val = DataLoader(data.ToyCity(2, size, split="val", ood=True,
                                  transform=data.eval_transforms()), batch_size=2)
    student = models.DUDESStudent(models.unet_family("M128/4", data.ToyCity.NUM_CLASSES))
    res = evaluate(student, val, data.ToyCity.NUM_CLASSES, device="cpu", ood=True)
    assert {"miou", "ece", "error_auroc", "ood_auroc", "m_unc"} <= res.keys()


# ----------------------------------------------------------------------------- grid search, results
def test_grid_search_mean_and_std_over_seeds():
    def run(lr, depth, seed):
        return {"miou": lr * 10 + seed, "name": "x"}

    rows = grid_search(run, {"lr": [0.1, 0.2], "depth": [3]}, seeds=[0, 1, 2])
    assert [(r["lr"], r["depth"], r["n_seeds"]) for r in rows] == [(0.1, 3, 3), (0.2, 3, 3)]
    assert rows[0]["miou_mean"] == pytest.approx(2.0) and rows[0]["miou_std"] == pytest.approx(1.0)
    assert "name_mean" not in rows[0]
    assert format_mean_std(rows[1], "miou") == "3.000 ± 1.000"
    with pytest.raises(ValueError, match="non-empty"):
        grid_search(run, {"lr": []}, seeds=[0])


def test_save_results_writes_a_flat_json(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIKD_MODE", "quick")
    results = {"student": {"miou": 0.123456789, "iou": torch.tensor([0.5, float("nan")])},
               "params": 30566, "ece": float("inf")}
    path = save_results("03_dudes", results, tmp_path)
    assert path == tmp_path / "03_dudes.json"
    saved = json.loads(path.read_text())
    assert saved == {"student.miou": 0.123457, "student.iou": [0.5, None], "params": 30566,
                     "ece": None, "mode": "quick", "device": saved["device"]}
    assert saved["device"] == "cpu" or saved["device"].startswith("cuda")
    assert [p.name for p in tmp_path.iterdir()] == ["03_dudes.json"]
    with pytest.raises(ValueError, match="file stem"):
        save_results("../x", {}, tmp_path)
    with pytest.raises(ValueError, match="'mode'"):
        save_results("x", {"mode": "full"}, tmp_path)


def test_results_default_to_the_checkout_results_folder(tmp_path, monkeypatch):
    """Notebooks run in notebooks/ but must write to <checkout>/results (or $MINIKD_RESULTS_DIR)."""
    from minikd.training import default_results_dir

    monkeypatch.delenv("MINIKD_RESULTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_results_dir() == Path(__file__).resolve().parents[1] / "results"
    monkeypatch.setenv("MINIKD_RESULTS_DIR", str(tmp_path / "elsewhere"))
    path = save_results("x", {"a": 1.0})
    assert path == tmp_path / "elsewhere" / "x.json" and path.is_file()


def test_save_results_rounds_nan_inside_a_list_of_rows(tmp_path):
    """Table rows are lists of dicts; a NaN in one (a class nobody predicts) becomes null."""
    path = save_results("rows", {"table": [{"miou": float("nan"), "n": 3},
                                           {"miou": torch.tensor(0.1234567)}]}, tmp_path)
    rows = json.loads(path.read_text())["table"]
    assert rows == [{"miou": None, "n": 3}, {"miou": 0.123457}]


def test_class_table_splits_into_blocks_with_the_tail_last():
    classes = [f"c{i}" for i in range(5)]
    rows = [("A", [str(i) for i in range(5)], ["2.0", "x"]), ("B", list("abcde"), ["m", "y"])]
    text = training.class_table(classes, rows, tail=("Mean", "paper"), max_columns=2)
    assert text.split("\n\n") == [
        "|  | c0 | c1 |\n|---|---|---|\n| A | 0 | 1 |\n| B | a | b |",
        "|  | c2 | c3 |\n|---|---|---|\n| A | 2 | 3 |\n| B | c | d |",
        "|  | c4 | Mean | paper |\n|---|---|---|---|\n| A | 4 | 2.0 | x |\n| B | e | m | y |"]
    one = training.class_table(classes, rows[:1], tail=("Mean", "paper"))
    assert one.count("\n\n") == 0 and one.splitlines()[0].endswith("| c4 | Mean | paper |")
    with pytest.raises(ValueError, match="row 'A' has 5 class cells and 2 tail cells; expected 5 and 1"):
        training.class_table(classes, rows[:1])


def test_pick_threads_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for idle, expected in ((0.1, 1), (1.4, 1), (2.6, 3), (4.0, 4), (9.0, 4)):
        monkeypatch.setattr(training, "_idle_cores", lambda idle=idle: idle)
        assert training.pick_threads(set_torch=False) == expected, idle
    assert training.pick_threads(set_torch=False, max_threads=2) == 2
    monkeypatch.setattr(training, "_idle_cores", lambda: None)  # no /proc/stat: load average
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0.0, 0.0))
    assert training.pick_threads(set_torch=False) == 1
    before = torch.get_num_threads()
    try:
        assert training.pick_threads() == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_idle_cores_reads_proc_stat():
    idle = training._idle_cores(0.05)
    if idle is None:
        pytest.skip("no /proc/stat on this system")
    assert 0.0 <= idle <= os.cpu_count() + 1e-6
