"""minikd.protocol (notebook 06): Niemann's stages choose on the selection metric only, share runs,
and report mean ± std with the within-one-std marks; checked on a synthetic train_eval whose
optimum is known."""
import json
import math

import pytest

from minikd import protocol

LRS, WDS, TAUS = [1e-1, 1e-2, 1e-3], [5e-4, 5e-6], [1, 2, 4]


def synthetic(calls):
    """val peaks at lr 1e-2 / wd 5e-6 for KD, lr 1e-1 / wd 5e-4 alone; τ 2; λ_pa 0.1.
    test is the *opposite* of val, so any choice that read test would pick other points."""
    def train_eval(*, kd, lr, weight_decay, tau, term, lam, seed):
        calls.append((kd, lr, weight_decay, tau, term, lam, seed))
        if kd:
            v = 0.5 - abs(math.log10(lr) + 2) / 10 - (weight_decay > 1e-5) * 0.02
            v -= abs(tau - 2) / 100 + (abs(math.log10(lam) + 1) / 100 if term else 0)
        else:
            v = 0.45 - abs(math.log10(lr) + 1) / 10 - (weight_decay < 1e-5) * 0.02
        v += 0.001 * seed
        return {"val": v, "test": 1.0 - v}
    return train_eval


def run(calls, **kw):
    args = {"lr_grid": LRS, "wd_grid": WDS, "taus": TAUS, "terms": {"pa": [1e-2, 1e-1, 1.0]},
            "selection_seeds": [0], "final_seeds": [0, 1, 2],
            "default": {"lr": 1e-2, "weight_decay": 5e-4}}
    args.update(kw)
    return protocol.fair_protocol(synthetic(calls), **args)


def test_each_arm_is_tuned_on_the_selection_metric_alone():
    calls = []
    rec = run(calls)
    assert rec["best"]["kd"] == {"lr": 1e-2, "weight_decay": 5e-6}
    assert rec["best"]["student"] == {"lr": 1e-1, "weight_decay": 5e-4}
    assert rec["best_tau"] == 2 and rec["best_lam"] == {"pa": 0.1}
    assert [r["row"] for r in rec["final"]] == ["CE", "CE + L_PI", "CE + L_PI + L_PA"]
    assert rec["final"][2]["config"] == {"kd": True, "lr": 1e-2, "weight_decay": 5e-6,
                                         "tau": 2, "term": "pa", "lam": 0.1}


def test_runs_are_shared_between_stages_and_never_repeated():
    calls = []
    rec = run(calls)
    assert len(calls) == len(set(calls)) == rec["n_runs"]
    # stage 1: 2 arms x 6 points; stage 2: 2 new τ; stage 3: 3 λ; final: 3 rows x 2 new seeds;
    # default: CE's seed 0 is a stage-1 run, its seeds 1, 2 and the KD default's 3 seeds are new
    assert rec["n_runs"] == 12 + 2 + 3 + 6 + 2 + 2


def test_tuned_baseline_beats_default_on_selection_and_marks_follow_the_std():
    rec = run([])
    tuned = max(r["val_mean"] for r in rec["stage1"]["student"])
    default = next(r for r in rec["stage1"]["student"]
                   if r["lr"] == 1e-2 and r["weight_decay"] == 5e-4)
    assert tuned >= default["val_mean"]
    means = [r["test_mean"] for r in rec["final"]]
    best = max(range(3), key=means.__getitem__)
    assert [r["best"] for r in rec["final"]] == [i == best for i in range(3)]
    bar = means[best] - rec["final"][best]["test_std"]
    assert [r["within_one_std"] for r in rec["final"]] == [m >= bar for m in means]
    assert rec["final"][0]["test_std"] == pytest.approx(0.001)  # seeds 0, 1, 2 add 0.001 each


def test_choices_on_the_edge_of_a_grid_are_noted():
    rec = run([])
    note = ("student: μ(0) = 0.1 is the largest value of the grid [0.1, 0.01, 0.001]: extend the "
            "grid beyond it before trusting the choice")
    assert rec["edges"] == [note]


def test_record_is_json_and_tables_render_in_the_paper_layout():
    rec = run([])
    json.dumps(rec)
    grid = protocol.lr_wd_table(rec["stage1"]["kd"], "val")
    assert grid.count("\n") == 1 + len(WDS) and "**" in grid
    table = protocol.final_table(rec["final"], "test", "ToyCity test mIoU (%)")
    assert table.splitlines()[4].startswith("| x | x |  |  |")


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="not a point of the grid"):
        run([], default={"lr": 3e-2, "weight_decay": 5e-4})
    with pytest.raises(ValueError, match="τ = 1"):
        run([], taus=[2, 4])
    with pytest.raises(ValueError, match="unknown extra terms"):
        run([], terms={"cwd": [1.0]})
    with pytest.raises(ValueError, match="empty"):
        run([], final_seeds=[])
