"""Machinery a learner may skip: what the scripts share on the command line (errors, numbers, --set,
the compilation cache).

    UserError          a problem the user can fix, told in one sentence; the scripts exit with its code
    DataError, BadFlag its kinds: data that cannot be read; flags that cannot work (exit 2)
    OneLineParser      argparse that reports a bad command line in one sentence, exit status 2
    number(...)        the one argparse type for numbers: whole or real, with its range
    config_setting     --set FIELD=VALUE for any field of leviathan.Config, parsed by the field's type
    use_compile_cache  JAX's persistent compilation cache, so a rerun does not compile again
    exit_now           end this process at once with one sentence (os._exit)
    end_on_ctrl_c      from now on a Ctrl-C ends the process with one sentence, exit 130
"""

import argparse
import dataclasses
import math
import os
import signal
import sys


class UserError(Exception):
    """A problem the user can fix, told in one sentence: the scripts print it and exit with `code`."""

    code = 1


class DataError(UserError):
    """A shard that cannot be read: missing, corrupt, truncated, unreachable."""


class BadFlag(UserError):
    code = 2  # as argparse: a flag or a combination of flags that cannot work


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one sentence (exit status 2), not a usage block."""

    def error(self, message):
        print(f"error: {message}; see python {self.prog} --help.", file=sys.stderr)
        sys.exit(2)


SUFFIXES = {"k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}  # 64k, 2M, 1.5B: for whole numbers


def number(low, whole=True, strict=False):
    """An argparse type: a finite number of at least `low` (above it if `strict`). A whole number may
    be written 2000000, 2e6 or 2M (suffixes k, M, B, T); its value is an int, else a float."""
    kind = "a whole number" if whole else "a number"
    rule = f"{kind} above {low:g}" if strict else f"{kind} of {low:g} or more"

    def parse(text):
        scale = SUFFIXES.get(text[-1:], 1) if whole else 1
        try:
            value = float(text[:-1] if scale != 1 else text) * scale
        except ValueError:
            value = math.nan
        fits = math.isfinite(value) and (value > low if strict else value >= low)
        if not fits or (whole and value != int(value)):
            suffix = " (like 2000000, 2e6 or 2M)" if whole else ""
            raise argparse.ArgumentTypeError(f"must be {rule}{suffix}, not {text!r}")
        return int(value) if whole else value
    return parse


def config_setting(config_class, own_flags):
    """The argparse type of --set FIELD=VALUE: -> (field, value), the value parsed by the field's type.
    Fields in `own_flags` ({field: flag}) are refused with the name of their flag."""
    types = {f.name: f.type for f in dataclasses.fields(config_class) if f.name not in own_flags}
    valid = f"the fields --set takes are {', '.join(types)}"

    def parse(text):
        name, equals, value = text.partition("=")
        if name in own_flags:
            raise argparse.ArgumentTypeError(f"{name} has its own flag, {own_flags[name]}; use that")
        if not equals or name not in types:
            raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE with a Config field; {valid}")
        kind = types[name]
        try:
            return name, ({"true": True, "false": False}[value.lower()] if kind is bool else kind(value))
        except (KeyError, ValueError):
            raise argparse.ArgumentTypeError(f"{name}={value!r}: {name} takes {kind.__name__} values; "
                                             f"{valid}") from None
    return parse


def compile_cache_dir():
    """Where compiled programs are kept: $LEVIATHAN_COMPILE_CACHE, else <user cache>/leviathan/jax;
    None when LEVIATHAN_COMPILE_CACHE=off."""
    where = os.environ.get("LEVIATHAN_COMPILE_CACHE", "")
    if where.lower() in ("off", "0", "no", "false"):
        return None
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return where or os.path.join(cache_home, "leviathan", "jax")


def use_compile_cache():
    """Turn on JAX's persistent compilation cache (every program, however quick to compile): a rerun
    of the same shapes loads its programs from disk instead of compiling them. Returns the folder."""
    import jax

    folder = compile_cache_dir()
    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def exit_now(message, code):
    """End this process at once with one sentence. os._exit: no waiting for other processes that may
    have died (jax.distributed's shutdown), and no interpreter teardown under native threads that are
    still running (the tokenizer's, XLA's), which can crash."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def end_on_ctrl_c(sentence):
    """From now on a Ctrl-C ends this process at once with `sentence`, exit 130. Set before JAX loads
    (seconds), where a Ctrl-C would otherwise surface as an ImportError's traceback; train.py's loop
    sets its own handler once there is a checkpoint to keep."""
    signal.signal(signal.SIGINT, lambda signum, frame: exit_now(sentence, 130))
