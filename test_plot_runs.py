"""plot.py tells runs apart by size, seed and --set fields (issue 18): a run of one ablation never
replaces another's, and each pair is one dense and one Leviathan run made with the same --set."""
import json
from pathlib import Path

import plot

LAB = Path(__file__).parent / "results" / "lab"


def write_run(folder, model, seed=0, settings=None, size="tiny"):
    """A minimal run folder: config.json (with "set" when given) and a log with two evaluations."""
    folder.mkdir(parents=True)
    config = {"model": model, "size": size, "seed": seed, "n_params": 1000}
    if settings is not None:
        config["set"] = settings
    (folder / "config.json").write_text(json.dumps(config))
    records = [{"step": s, "tokens": 512 * s, "train_loss": 9.0, "val_loss": 9.0 - s / 100,
                "data_hash": f"h{s}"} for s in (25, 50)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def pairs_of(paths):
    plot.WARNINGS.clear()
    return {pair["label"]: pair for pair in plot.match_pairs(plot.load_runs(paths))}


def test_set_fields_keep_ablations_apart(tmp_path):
    write_run(tmp_path / "leviathan-s0", "leviathan", settings={})
    write_run(tmp_path / "knots8-s0", "leviathan", settings={"gen_knots": 8})
    write_run(tmp_path / "rank16-knots8-s0", "leviathan", settings={"gen_rank": 16, "gen_knots": 8})
    write_run(tmp_path / "dense-s0", "dense", settings={})
    write_run(tmp_path / "dense-rms-s0", "dense", settings={"embed_norm": "rms"})
    write_run(tmp_path / "leviathan-rms-s0", "leviathan", settings={"embed_norm": "rms"})
    write_run(tmp_path / "old-s1", "leviathan", seed=1)  # a config from before "set": no --set fields
    pairs = pairs_of([tmp_path])
    assert not plot.WARNINGS
    assert set(pairs) == {"tiny/seed 0", "tiny/seed 0 gen_knots=8", "tiny/seed 0 gen_knots=8 gen_rank=16",
                          "tiny/seed 0 embed_norm=rms", "tiny/seed 1"}
    assert (pairs["tiny/seed 0"]["leviathan"]["name"], pairs["tiny/seed 0"]["dense"]["name"]) == (
        "leviathan-s0", "dense-s0")
    assert pairs["tiny/seed 0 embed_norm=rms"]["leviathan"]["name"] == "leviathan-rms-s0"
    assert pairs["tiny/seed 0 embed_norm=rms"]["dense"]["name"] == "dense-rms-s0"
    assert pairs["tiny/seed 0 gen_knots=8"]["leviathan"]["pair"] == "unpaired"
    assert pairs["tiny/seed 0"]["leviathan"]["pair"] == "matched"


def test_a_students_run_beside_the_lab_replaces_only_its_own_kind(tmp_path):
    """The issue's case: a student's run drawn beside results/lab. A run with other --set fields is kept
    apart; one with the same size, seed and --set fields is the same kind, and the warning says why."""
    write_run(tmp_path / "tiny-mine", "leviathan", settings={"gen_rank": 4})
    pairs = pairs_of([LAB, tmp_path])
    assert not plot.WARNINGS, plot.WARNINGS
    assert pairs["tiny/seed 0 gen_rank=4"]["leviathan"]["name"] == "tiny-mine"
    assert pairs["tiny/seed 0 gen_knots=8"]["leviathan"]["name"] == "leviathan-knots8-s0"
    write_run(tmp_path / "again" / "leviathan-s0", "leviathan", settings={})
    pairs = pairs_of([LAB, tmp_path / "again"])
    [warning] = plot.WARNINGS
    assert warning.startswith("tiny/seed 0 has two leviathan runs with the same size, seed and --set fields; ")
    assert "again/leviathan-s0" in warning and "lab/leviathan-s0" in warning


def test_the_committed_lab_forms_its_pairs_without_a_warning():
    pairs = pairs_of([LAB])
    assert not plot.WARNINGS, plot.WARNINGS
    assert len(pairs) == 2 * 7  # per seed: as built, embed_norm=rms (pairs); 5 Leviathan or dense ablations
    for seed in (0, 1):
        for label in (f"tiny/seed {seed}", f"tiny/seed {seed} embed_norm=rms"):
            assert pairs[label]["leviathan"]["pair"] == pairs[label]["dense"]["pair"] == "matched"
        assert "leviathan" not in pairs[f"tiny/seed {seed} embed_init_std=0.21"]
