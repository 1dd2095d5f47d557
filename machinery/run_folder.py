"""Machinery a learner may skip: the files of a run folder, each written whole (into a temporary
file, then renamed), so a kill at any moment leaves the last good checkpoint.

    config.json          the run's settings (README: Run folder format)
    log.jsonl            one JSON object per logged step
    ckpt.npz             train state, data position and tally: what --resume continues from
    params.npz           the parameters alone, for sampling (leviathan.save_params)
    data-<step>-p<i>.npz process i's data position, when several processes read the data
"""

import glob
import json
import os

import jax
import numpy as np

from machinery.cli import BadFlag, UserError

RUN_FILES = ("config.json", "log.jsonl", "ckpt.npz", "params.npz")


def check_out(out, resume):
    """Refuse, before anything is written, a folder that holds a run unless --resume continues it,
    and --resume where there is no checkpoint to continue."""
    ckpt, held = os.path.join(out, "ckpt.npz"), [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if resume and not os.path.exists(ckpt):
        fix = f"delete {out} or choose another --out" if held else "run without --resume"
        raise UserError(f"--resume found no checkpoint {ckpt}; {fix} to start afresh")
    if not resume and "ckpt.npz" in held:
        raise BadFlag(f"{out} already holds a run ({ckpt}); add --resume to continue it or choose another --out")
    if not resume and held:
        raise BadFlag(f"{out} already holds the files of a run ({', '.join(held)}) but no checkpoint to resume; "
                      "choose another --out, or delete the folder to start afresh")


def changed_settings(old, new, defaults, adjustable):
    """The run settings that differ between a checkpoint's (`old`) and this command's (`new`), the
    Config fields in `adjustable` aside; a Config field added since the checkpoint counts as its default."""
    old_config = {**defaults, **old["config"]}
    return [key for key in new if key != "config" and old.get(key) != new[key]] + [
        key for key in new["config"] if key not in adjustable and old_config.get(key) != new["config"][key]]


def write_atomically(path, contents):
    """Write bytes (or call contents(file)) into path + '.tmp', sync it, rename: `path` is always whole."""
    with open(path + ".tmp", "wb") as f:
        contents(f) if callable(contents) else f.write(contents)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def pack(value, name, arrays):
    """A JSON-able copy of `value` (dicts, numbers, strings, arrays, lists of equal arrays): every
    array goes into `arrays` under a key made from `name`, and {"__array__": key} stands in its place."""
    if isinstance(value, dict):
        return {k: pack(v, f"{name}.{k}", arrays) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        arrays[name] = value
        return {"__array__": name}
    if isinstance(value, list) and value and all(isinstance(x, np.ndarray) for x in value):
        arrays[name] = np.stack(value)  # the shuffle buffer: rows of one length
        return {"__rows__": name}
    return value


def unpack(value, f):
    """The inverse of pack, reading the arrays from an open .npz."""
    if isinstance(value, dict) and set(value) in ({"__array__"}, {"__rows__"}):
        (kind, key), = value.items()
        return f[key] if kind == "__array__" else list(f[key])
    if isinstance(value, dict):
        return {k: unpack(v, f) for k, v in value.items()}
    return value


def save_npz(path, tree):
    """A tree of JSON-able values and arrays as one .npz (its arrays, and "meta", the JSON rest)."""
    arrays = {}
    meta = json.dumps(pack(tree, "x", arrays))
    write_atomically(path, lambda f: np.savez(f, meta=np.array(meta), **arrays))


def load_npz(path):
    with np.load(path) as f:
        return unpack(json.loads(str(f["meta"])), f)


def save_checkpoint(path, train_state, data_state, meta):
    """One .npz: the train state's leaves (params, optimizer state, step; float32 or int32), the data
    state (stream position, tally) and meta (step, run settings)."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(train_state))]
    save_npz(path, {"leaves": {str(i): x for i, x in enumerate(leaves)}, "data": data_state, "meta": meta})


def load_checkpoint(path):
    """-> (meta, leaves, data_state) of a checkpoint written by save_checkpoint."""
    try:
        tree = load_npz(path)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}); restore it or start a new --out") from None
    leaves = [tree["leaves"][str(i)] for i in range(len(tree["leaves"]))]
    return tree["meta"], leaves, tree["data"]


def data_file(out, step, process):
    """Where process `process` keeps its data position at `step`, when several processes read the data."""
    return os.path.join(out, f"data-{step}-p{process}.npz")


def load_data_file(path):
    try:
        return load_npz(path)
    except Exception as e:
        raise UserError(f"this process's data position {path} cannot be read ({type(e).__name__}); resume with "
                        "the same processes and an --out every process reads (a shared filesystem)") from None


def drop_data_files(out, process, keep_step):
    """Remove this process's data files of steps before the checkpoint's."""
    for old in glob.glob(data_file(out, "*", process)):
        if old != data_file(out, keep_step, process):
            os.remove(old)


def restore_state(fresh, leaves):
    """A freshly initialised train state holding the checkpoint's values, placed like the fresh one."""
    ref, treedef = jax.tree_util.tree_flatten(fresh)
    if [(r.shape, r.dtype) for r in ref] != [(x.shape, x.dtype) for x in leaves]:
        raise UserError("the checkpoint's arrays do not fit this model; resume with the original flags")
    return jax.tree_util.tree_unflatten(treedef, [jax.device_put(x, r.sharding) for x, r in zip(leaves, ref)])


@jax.jit
def all_finite(tree):
    """True when no array of the pytree holds a NaN or an infinity: only a finite state is saved."""
    return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]).all()


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, step):
    """Keep the log lines up to `step` (a resumed run writes the later steps again). A line is
    written whole with its newline, so one without a newline was cut short by a kill: it goes too."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        write_atomically(path, "".join(kept).encode())
