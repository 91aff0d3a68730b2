"""The model zoo: shipped weights match the manifest and still reproduce their figures.

Tests 1-2 check the REAL package zoo (``minikd/zoo/manifest.json``): every entry must be
trained (sha256, figures, curve recorded), its file must load, and it must reproduce its
recorded ``check_miou`` on the fixed validation subset; a change to ToyCity or to a model class
that makes the zoo stale fails here with the command that retrains the entry. The rest runs a
tiny recipe (4 iterations of the M128/4 U-Net) in pytest's tmp_path: determinism,
resumability, publishing, clear errors on bad files, ``load_or_train`` and the CLI.
"""

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from minikd import models, training
from minikd.data import ToyCity

REAL_ENTRIES = models.zoo_manifest()["entries"]
TINY = "toy/tiny"
TRAIN_HINT = "python -m minikd.training zoo --train"
MAX_ZOO_BYTES = 80 * 1024 * 1024
CHECK_TOL = 0.005  # |measured - recorded| check_miou
CHECK_RMSE_TOL = 0.005  # |measured - recorded| check_depth_rmse, relative (depth models)
PLATEAU_TOL = 0.03  # the curve's last point within this of its best


# --------------------------------------------------------------------------- helpers
def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _require_trained(name: str, entry: dict) -> None:
    """FAIL (never skip) for an entry that has not been trained and published yet."""
    if "sha256" not in entry:
        pytest.fail(f"zoo entry {name!r} is untrained (no sha256 in minikd/zoo/manifest.json); "
                    f"train it with `{models.retrain_command(name)}`", pytrace=False)


def _check_reproduces(name: str, entry: dict, manifest: dict, model: torch.nn.Module) -> float:
    """The entry's check_miou, measured again; AssertionError naming it and its command."""
    r = entry["recipe"]
    spec = training.zoo_validation_spec(manifest, entry)
    val = training.zoo_validation_set(manifest, r["size"], spec["check_n"], entry)
    res = training.zoo_evaluate(model, DataLoader(val, batch_size=16))
    measured = None
    for key, figure, tol in (("check_miou", "miou", CHECK_TOL),
                             ("check_depth_rmse", "depth_rmse", CHECK_RMSE_TOL)):
        if key not in entry["val"]:
            continue
        measured, recorded = res[figure], entry["val"][key]
        if key == "check_depth_rmse":
            tol *= recorded  # relative
        assert abs(measured - recorded) <= tol, (
            f"stale zoo entry {name!r}: {key} on the first {spec['check_n']} {spec['domain']} "
            f"validation images is {measured:.6f}, the manifest records {recorded:.6f} "
            f"(tolerance {tol:.4g}); ToyCity or {entry['builder']} changed since it was trained. "
            f"Retrain it with `{models.retrain_command(name)}`")
    assert measured is not None, f"{name}: the manifest records neither check_miou nor " \
        "check_depth_rmse"
    return res["miou"] if "check_miou" in entry["val"] else measured


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _differing(a: dict, b: dict) -> list[str]:
    return sorted(a.keys() ^ b.keys()) + [k for k in a if k in b and not torch.equal(a[k], b[k])]


def _tiny_manifest() -> dict:
    """The real manifest's format and validation spec, one tiny entry with a tiny recipe."""
    real = models.zoo_manifest()
    template = copy.deepcopy(next(iter(real["entries"].values())))
    recipe = template["recipe"]
    recipe["data"]["n"] = 16
    recipe.update(iterations=4, val_every=2, curve_n=4)
    entry = {"file": "toy_tiny.pt", "builder": "unet_family",
             "args": {"name": "M128/4", "num_classes": ToyCity.NUM_CLASSES},
             "input": template.get("input", ""), "recipe": recipe}
    return {"format": real["format"],
            "validation": dict(real["validation"], n=8, check_n=4),
            "entries": {TINY: entry}}


def _write_manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    path.write_text(json.dumps(_tiny_manifest(), indent=1) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny recipe trained once: (model, fields, manifest path, work dir)."""
    root = tmp_path_factory.mktemp("zoo")
    manifest_path = _write_manifest(root / "manifest")
    work = root / "work"
    model, fields = training.train_zoo_entry(TINY, work, manifest_path=manifest_path,
                                             progress=False)
    return model, fields, manifest_path, work


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch, tiny_run):
    """The package zoo pointed at a tmp folder holding the published tiny entry."""
    _, fields, _, _ = tiny_run
    manifest_path = _write_manifest(tmp_path / "fake_zoo")
    training.publish_zoo_entry(TINY, fields, manifest_path)
    monkeypatch.setattr(models, "ZOO_DIR", manifest_path.parent)
    monkeypatch.setattr(models, "ZOO_MANIFEST", manifest_path)
    return manifest_path


# --------------------------------------------------------------------------- 1. the real zoo
def test_manifest_is_strict_json_in_the_expected_format():
    text = models.ZOO_MANIFEST.read_text()

    def no_nan(constant):
        raise AssertionError(f"minikd/zoo/manifest.json holds {constant}: not valid JSON")

    manifest = json.loads(text, parse_constant=no_nan)
    assert manifest["format"] == "minikd-zoo-1"
    assert {"split", "domain", "seed", "n", "check_n"} <= set(manifest["validation"])
    assert 0 < manifest["validation"]["check_n"] <= manifest["validation"]["n"]
    assert manifest["entries"], "the zoo has no entries"


@pytest.mark.parametrize("name", sorted(REAL_ENTRIES))
def test_zoo_file_matches_sha256_and_loads(name):
    entry = REAL_ENTRIES[name]
    _require_trained(name, entry)
    path = models.ZOO_DIR / entry["file"]
    assert path.is_file(), f"{path} is missing; retrain with `{models.retrain_command(name)}`"
    assert _sha(path) == entry["sha256"], (
        f"{path} does not match its sha256; retrain with `{models.retrain_command(name)}`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    model = models.pretrained(name)
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in state.items())


@pytest.mark.parametrize("name", sorted(REAL_ENTRIES))
def test_zoo_entry_records_figures_and_a_plateaued_curve(name):
    entry = REAL_ENTRIES[name]
    _require_trained(name, entry)
    missing = {"sha256", "val", "curve", "trained", "command"} - set(entry)
    assert not missing, f"{name}: manifest entry lacks {sorted(missing)}"
    assert entry["command"] == models.retrain_command(name)
    val = entry["val"]
    seg = entry["recipe"]["loss"] != "depth_gnll"  # a DepthFormer has no segmentation figures
    depth = entry["recipe"]["loss"] in ("seg_depth", "depth_gnll")
    if seg:
        assert {"miou", "pixel_acc", "iou", "check_miou"} <= set(val)
        assert list(val["iou"]) == list(ToyCity.CLASSES)
        for v in [val["miou"], val["pixel_acc"], val["check_miou"], *val["iou"].values()]:
            assert math.isfinite(v) and 0.0 <= v <= 1.0, f"{name}: bad figure {v}"
    if depth:
        assert {"depth_rmse", "depth_delta1", "check_depth_rmse"} <= set(val)
        assert 0 < val["depth_rmse"] < 100 and 0 <= val["depth_delta1"] <= 1
    assert {"time_s", "machine", "threads", "minikd", "torch", "date"} <= set(entry["trained"])
    curve = entry["curve"]
    if entry["recipe"]["iterations"] == 0:  # AdaBN: statistics re-estimated, no gradient step
        assert entry["recipe"]["method"]["name"] == "adabn" and entry["recipe"].get("init"), (
            f"{name}: a recipe without iterations must adapt another entry (AdaBN)")
        assert curve == []
        return
    assert len(curve) >= 3, f"{name}: the curve has {len(curve)} points"
    steps = [p["step"] for p in curve]
    assert steps == sorted(steps) and steps[-1] == entry["recipe"]["iterations"]
    if seg:
        mious = [p["miou"] for p in curve]
        assert mious[-1] >= max(mious) - PLATEAU_TOL, (
            f"{name}: no plateau, last mIoU {mious[-1]:.3f} vs best {max(mious):.3f}; train "
            f"longer and retrain with `{models.retrain_command(name)}`")
    else:  # depth RMSE in metres, lower is better: the last within 3 % of the best
        rmses = [p["depth_rmse"] for p in curve]
        assert rmses[-1] <= min(rmses) * (1 + PLATEAU_TOL), (
            f"{name}: no plateau, last depth RMSE {rmses[-1]:.3f} m vs best {min(rmses):.3f} m; "
            f"train longer and retrain with `{models.retrain_command(name)}`")


def test_zoo_size_and_no_stray_weights():
    files = sorted(models.ZOO_DIR.glob("*.pt"))
    total = sum(f.stat().st_size for f in files)
    assert total <= MAX_ZOO_BYTES, f"the zoo is {total / 2**20:.1f} MB (> {MAX_ZOO_BYTES // 2**20} MB)"
    listed = {e["file"] for e in REAL_ENTRIES.values()}
    stray = [f.name for f in files if f.name not in listed]
    assert not stray, f"weights in minikd/zoo/ that no manifest entry names: {stray}"


# --------------------------------------------------------------------------- 2. reproduction
@pytest.mark.parametrize("name", sorted(REAL_ENTRIES))
def test_zoo_entry_reproduces_its_check_miou(name):
    entry = REAL_ENTRIES[name]
    _require_trained(name, entry)
    _check_reproduces(name, entry, models.zoo_manifest(), models.pretrained(name))


def test_stale_and_untrained_messages_name_the_entry_and_command(tiny_run):
    model, fields, manifest_path, _ = tiny_run
    manifest = models.zoo_manifest(manifest_path)
    entry = dict(manifest["entries"][TINY], val=fields["val"])
    assert _check_reproduces(TINY, entry, manifest, model) == pytest.approx(
        fields["val"]["check_miou"], abs=1e-6)
    stale = dict(entry, val=dict(fields["val"], check_miou=fields["val"]["check_miou"] + 0.1))
    with pytest.raises(AssertionError, match=f"stale zoo entry '{TINY}'.*{TRAIN_HINT} {TINY}"):
        _check_reproduces(TINY, stale, manifest, model)
    with pytest.raises(pytest.fail.Exception, match=f"untrained.*{TRAIN_HINT} {TINY}"):
        _require_trained(TINY, manifest["entries"][TINY])


# --------------------------------------------------------------------------- 3-4. the recipe
def test_recipe_is_deterministic(tiny_run, tmp_path):
    model, fields, manifest_path, _ = tiny_run
    torch.manual_seed(12345)  # whatever ran before must not matter: the recipe sets every seed
    torch.rand(1000)
    again, fields2 = training.train_zoo_entry(TINY, tmp_path / "other", manifest_path=manifest_path,
                                              progress=False)
    differ = _differing(model.state_dict(), again.state_dict())
    assert not differ, (f"two runs of the same recipe give different weights ({len(differ)} "
                        f"tensors, first {differ[:3]}): is the model's initialisation seeded?")
    assert fields2["val"] == fields["val"] and fields2["curve"] == fields["curve"]
    assert [p["step"] for p in fields["curve"]] == [2, 4]
    assert _sha(fields2["weights"]) == _sha(fields["weights"])


def test_recipe_resumes_from_the_finished_checkpoint(tiny_run, capsys):
    model, fields, manifest_path, work = tiny_run
    last = work / TINY / "checkpoint" / training.CKPT_NAME
    before = (last.stat().st_mtime_ns, _sha(last))
    capsys.readouterr()
    again, fields2 = training.train_zoo_entry(TINY, work, manifest_path=manifest_path,
                                              progress=False)
    assert "nothing to train" in capsys.readouterr().out
    assert (last.stat().st_mtime_ns, _sha(last)) == before, "the checkpoint was rewritten"
    assert _states_equal(model.state_dict(), again.state_dict())
    assert fields2["curve"] == fields["curve"] and fields2["val"] == fields["val"]


# --------------------------------------------------------------------------- 5. publishing
def test_publish_writes_weights_and_sha256_next_to_the_manifest(tiny_run, tmp_path):
    model, fields, _, _ = tiny_run
    manifest_path = _write_manifest(tmp_path / "zoo")
    training.publish_zoo_entry(TINY, fields, manifest_path)
    entry = models.zoo_entry(TINY, models.zoo_manifest(manifest_path))
    target = manifest_path.parent / entry["file"]
    assert target.is_file() and entry["sha256"] == _sha(target)
    assert entry["val"] == fields["val"] and entry["curve"] == fields["curve"]
    assert entry["trained"] == fields["trained"]
    assert entry["command"] == models.retrain_command(TINY)
    loaded = models.load_zoo_weights(models.build_from_entry(entry), target, entry["sha256"], TINY)
    assert _states_equal(loaded.state_dict(), model.state_dict())
    half = {k: v.half().float() if v.is_floating_point() else v
            for k, v in model.state_dict().items()}
    assert _states_equal(half, model.state_dict()), "the trained model is not float16-rounded"


# --------------------------------------------------------------------------- 6. bad files
def _other_model_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "other.pt"
    torch.save({k: v.half() for k, v in models.unet_family("M128/4", 6).state_dict().items()
                if v.is_floating_point()}, path)
    return path.read_bytes()


def _unsafe_pickle_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "unsafe.pt"
    torch.save({"weight": Path("not a tensor")}, path)  # weights_only refuses PosixPath
    return path.read_bytes()


def _flip(data: bytes, start: int, length: int = 64) -> bytes:
    out = bytearray(data)
    out[start:start + length] = bytes(b ^ 0xFF for b in out[start:start + length])
    return bytes(out)


BAD_FILES = {
    "truncated": lambda good, tmp: good[: len(good) // 2],
    "flipped_header": lambda good, tmp: _flip(good, 0),
    "flipped_tail": lambda good, tmp: _flip(good, len(good) - 64),
    "random": lambda good, tmp: os.urandom(len(good)),
    "empty": lambda good, tmp: b"",
    "other_model": lambda good, tmp: _other_model_bytes(tmp),
    "unsafe_pickle": lambda good, tmp: _unsafe_pickle_bytes(tmp),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file_gives_a_zoo_error_naming_file_and_command(kind, tiny_run, tmp_path):
    _, fields, _, _ = tiny_run
    bad = tmp_path / f"{kind}.pt"
    bad.write_bytes(BAD_FILES[kind](Path(fields["weights"]).read_bytes(), tmp_path))
    # its own sha256, so that the check passes and torch.load is reached
    with pytest.raises(models.ZooError) as err:
        models.load_zoo_weights(models.unet_family("M128/4", ToyCity.NUM_CLASSES), bad, _sha(bad),
                                TINY)
    msg = str(err.value)
    assert str(bad) in msg and f"{TRAIN_HINT} {TINY}" in msg
    assert "Traceback" not in msg and len(msg) < 1000


def test_flipped_bytes_fail_the_sha256_check(tiny_run, tmp_path):
    _, fields, _, _ = tiny_run
    good = Path(fields["weights"]).read_bytes()
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(_flip(good, len(good) // 2))  # inside tensor data: only the sha256 sees it
    with pytest.raises(models.ZooError, match="sha256") as err:
        models.load_zoo_weights(models.unet_family("M128/4", ToyCity.NUM_CLASSES), bad,
                                _sha(fields["weights"]), TINY)
    assert str(bad) in str(err.value) and TRAIN_HINT in str(err.value)


def test_missing_file_gives_a_zoo_error(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(models.ZooError, match="missing") as err:
        models.load_zoo_weights(models.unet_family("M128/4", ToyCity.NUM_CLASSES), missing,
                                "0" * 64, TINY)
    assert str(missing) in str(err.value) and f"{TRAIN_HINT} {TINY}" in str(err.value)


def test_pretrained_missing_or_corrupted_file_in_the_zoo(fake_zoo):
    target = fake_zoo.parent / models.zoo_entry(TINY)["file"]
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(models.ZooError, match="sha256"):
        models.pretrained(TINY)
    target.unlink()
    with pytest.raises(models.ZooError, match="missing"):
        models.pretrained(TINY)


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="available") as err:
        models.pretrained("toycity/no-such-model")
    assert all(name in str(err.value) for name in REAL_ENTRIES)
    with pytest.raises(ValueError, match="available"):
        training.load_or_train("toycity/no-such-model")


def test_bad_manifest_and_builder(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"format": "something-else", "entries": {}}))
    with pytest.raises(models.ZooError, match="not a minikd zoo manifest"):
        models.zoo_manifest(path)
    with pytest.raises(models.ZooError, match="builder"):
        models.build_from_entry({"builder": "no_such_builder", "args": {}})


# --------------------------------------------------------------------------- 7. load_or_train
def test_load_or_train_loads_from_the_zoo(fake_zoo, tiny_run, capsys):
    model = training.load_or_train(TINY)
    assert "loaded toy/tiny from the zoo" in capsys.readouterr().out
    assert not model.training
    assert _states_equal(model.state_dict(), tiny_run[0].state_dict())


def test_load_or_train_retrains_by_the_recipe(fake_zoo, tiny_run, tmp_path, capsys):
    text = fake_zoo.read_text()
    model = training.load_or_train(TINY, retrain=True, work_dir=tmp_path / "retrain")
    out = capsys.readouterr().out
    assert "trained toy/tiny here by its recipe" in out
    weights = tmp_path / "retrain" / TINY / "toy_tiny.pt"
    assert str(weights) in out and not model.training
    fresh = models.load_zoo_weights(models.build_from_entry(models.zoo_entry(TINY)), weights,
                                    None, TINY)
    assert _states_equal(model.state_dict(), fresh.state_dict())
    assert fake_zoo.read_text() == text, "retrain=True must not rewrite the manifest"


def test_zoo_list_prints_every_real_entry(capsys):
    training.zoo_main(["--list"])
    out = capsys.readouterr().out
    assert all(name in out for name in REAL_ENTRIES)
    training.main(["zoo", "--list"])
    assert capsys.readouterr().out == out


def test_zoo_cli_trains_and_publishes(fake_zoo, tiny_run, tmp_path, capsys):
    training.zoo_main(["--list"])
    assert TINY in capsys.readouterr().out
    training.zoo_main(["--train", TINY, "--work-dir", str(tmp_path / "cli")])
    assert f"{TINY}: val mIoU" in capsys.readouterr().out
    entry = models.zoo_entry(TINY)
    trained = tmp_path / "cli" / TINY / "toy_tiny.pt"
    assert entry["sha256"] == _sha(trained) == _sha(fake_zoo.parent / entry["file"])
    assert entry["command"] == models.retrain_command(TINY)
    models.pretrained(TINY)


# --------------------------------------------------------------------------- 8. CLI arguments
@pytest.mark.parametrize("argv", [[], ["--list", "--train", TINY], ["--bogus"]])
def test_zoo_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        training.zoo_main(argv)
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        training.main(["zoo", *argv])


def test_zoo_cli_unknown_entry(capsys):
    with pytest.raises(ValueError, match="available"):
        training.zoo_main(["--train", "toycity/no-such-model"])


def test_dudes_members_differ_only_by_seed_and_feed_a_16_channel_head():
    """Notebook 03's teacher (issue 10): ten M128 members, one recipe, ten seeds; the DUDES head
    reads at least 16 decoder channels (the quarter-width U-Net gave it 4, a 5-parameter head)."""
    names = [f"toycity-dudes/M128-{k}" for k in range(1, 11)]
    entries = [REAL_ENTRIES[n] for n in names]
    seeds = [e["recipe"]["seed"] for e in entries]
    assert len(set(seeds)) == 10, f"members share seeds: {seeds}"
    same = [{k: v for k, v in e["recipe"].items() if k != "seed"} for e in entries]
    assert all(r == same[0] for r in same), "the members' recipes differ beyond the seed"
    assert {e["builder"] for e in entries} == {"unet_family"}
    assert {json.dumps(e["args"], sort_keys=True) for e in entries} == {
        json.dumps({"name": "M128", "num_classes": 17}, sort_keys=True)}
    student = models.DUDESStudent(models.build_from_entry(entries[0]))
    head = [m for m in student.uncertainty_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert head and head[0].in_channels >= 16, f"head reads {head[0].in_channels} channels"
    # the student's pre-trained start saw other data: ToyCity's target domain
    init = REAL_ENTRIES["toycity-target/M128"]
    assert init["recipe"]["data"]["domain"] == "target" and init["args"] == entries[0]["args"]
