"""machinery/run_folder.py: a folder that holds a run is never overwritten; files round-trip whole."""

import json
import os

import numpy as np
import pytest

from machinery import run_folder
from machinery.cli import BadFlag, UserError


@pytest.mark.parametrize("files, resume, error, named", [
    ([], False, None, None),
    (["ckpt.npz", "config.json", "log.jsonl"], True, None, None),
    (["ckpt.npz"], False, BadFlag, "already holds a run"),
    (["config.json", "log.jsonl"], False, BadFlag, "but no checkpoint to resume; choose another --out, or delete"),
    (["params.npz"], False, BadFlag, r"already holds the files of a run \(params.npz\)"),
    (["config.json"], True, UserError, "found no checkpoint .*; delete .* or choose another --out to start afresh"),
    ([], True, UserError, "found no checkpoint .*; run without --resume to start afresh"),
])
def test_a_folder_holding_any_run_file_is_refused_without_resume(tmp_path, files, resume, error, named):
    for name in files:
        (tmp_path / name).write_text("kept")
    if error is None:
        run_folder.check_out(str(tmp_path), resume)
    else:
        with pytest.raises(error, match=named):
            run_folder.check_out(str(tmp_path), resume)
    assert sorted(os.listdir(tmp_path)) == sorted(files)  # nothing written, nothing removed


def test_the_committed_results_cannot_be_overwritten():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in ("results/lab/leviathan-s0", "results/tiny-minipile/tiny-dense"):
        with pytest.raises(BadFlag, match="no checkpoint to resume"):
            run_folder.check_out(os.path.join(here, folder), resume=False)


def test_a_data_state_round_trips_through_a_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    stream = {"epoch": 1, "documents": {"array": 3, "text": 1}, "rng": rng.bit_generator.state,
              "pending": np.arange(5, dtype=np.int32), "buffer": [np.arange(3), np.arange(3) + 1], "empty": []}
    tally = {"batches": 7, "data_hash": "ab" * 16, "counts": np.arange(10, dtype=np.int64)}
    path = str(tmp_path / "ckpt.npz")
    run_folder.save_checkpoint(path, {"w": np.ones(2, np.float32), "step": np.int32(3)},
                               {"shares": {"0": stream}, "tally": tally}, {"step": 3})
    meta, leaves, data_state = run_folder.load_checkpoint(path)
    assert meta == {"step": 3} and [x.tolist() for x in leaves] == [3, [1.0, 1.0]]
    got = data_state["shares"]["0"]
    assert got["documents"] == {"array": 3, "text": 1} and got["rng"] == rng.bit_generator.state
    assert got["pending"].tolist() == [0, 1, 2, 3, 4] and [b.tolist() for b in got["buffer"]] == [[0, 1, 2], [1, 2, 3]]
    assert got["empty"] == [] and data_state["tally"]["counts"].tolist() == list(range(10))
    assert not os.path.exists(path + ".tmp")


def test_resume_refuses_other_settings_but_accepts_a_new_lr_or_length():
    defaults, adjustable = {"gen_knots": 32, "embed_norm": "none"}, ("lr", "steps", "warmup_steps")
    old = {"config": {"lr": 1e-3, "steps": 8, "warmup_steps": 1, "seq_len": 32}, "seed": 0, "data": ["a"]}
    longer = {"config": {"lr": 5e-4, "steps": 20, "warmup_steps": 2, "seq_len": 32}, "seed": 0, "data": ["a"]}
    assert run_folder.changed_settings(old, longer, defaults, adjustable) == []
    other = {"config": {"lr": 1e-3, "steps": 8, "warmup_steps": 1, "seq_len": 64}, "seed": 1, "data": ["b"]}
    assert run_folder.changed_settings(old, other, defaults, adjustable) == ["seed", "data", "seq_len"]
    knob = {**old, "config": {**old["config"], "gen_knots": 32, "embed_norm": "rms"}}  # fields added later
    assert run_folder.changed_settings(old, knob, defaults, adjustable) == ["embed_norm"]  # missing: the default


def test_a_log_cut_by_a_kill_loses_only_the_cut_line(tmp_path):
    path = str(tmp_path / "log.jsonl")
    for step in (1, 2, 3):
        run_folder.append_log(path, {"step": step})
    with open(path, "a") as f:
        f.write('{"step": 4, "train_lo')
    run_folder.truncate_log(path, 2)
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2]


def test_a_state_holding_a_nan_is_not_finite():
    state = {"params": {"w": np.ones(3, np.float32)}, "step": np.int32(1)}
    assert bool(run_folder.all_finite(state))
    state["params"]["w"][1] = np.nan
    assert not bool(run_folder.all_finite(state))
