"""machinery/cli.py: the one number parser, --set, where the compilation cache lives, and Ctrl-C."""

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest

import leviathan as lv
from machinery import cli


def test_whole_numbers_take_suffixes_and_refuse_fractions():
    whole = cli.number(1)
    assert [whole(x) for x in ("2000000", "2e6", "2M", "1.5B", "64k")] == [2_000_000] * 3 + [1_500_000_000, 64_000]
    for bad in ("0", "-1", "2.5", "many", "inf", "nan", "1.5k5"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be a whole number of 1 or more .*{bad!r}"):
            whole(bad)
    assert cli.number(0)("0") == 0 and isinstance(whole("2e6"), int)


def test_real_numbers_keep_their_range():
    above_zero, at_least_zero = cli.number(0, whole=False, strict=True), cli.number(0, whole=False)
    assert above_zero("3e-4") == 3e-4 and at_least_zero("0") == 0.0 and at_least_zero("1.69") == 1.69
    for parse, bad, rule in ((above_zero, "0", "a number above 0"), (at_least_zero, "-0.1", "a number of 0 or more"),
                             (at_least_zero, "inf", "a number of 0 or more"), (above_zero, "2M", "a number above 0")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be {rule}, not {bad!r}"):
            parse(bad)


def test_set_parses_by_the_field_type_and_refuses_fields_with_their_own_flag():
    setting = cli.config_setting(lv.Config, {"lr": "--lr"})
    assert setting("gen_knots=8") == ("gen_knots", 8) and setting("remat=False") == ("remat", False)
    assert setting("embed_norm=rms") == ("embed_norm", "rms") and setting("init_std=0.05") == ("init_std", 0.05)
    for bad, named in (("lr=1", "lr has its own flag, --lr"), ("gen_knots=abc", "gen_knots takes int values"),
                       ("nope=1", "is not FIELD=VALUE with a Config field"), ("remat=maybe", "takes bool values")):
        with pytest.raises(argparse.ArgumentTypeError, match=named):
            setting(bad)


def test_the_compilation_cache_lives_in_the_users_cache_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.delenv("LEVIATHAN_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.compile_cache_dir() == os.path.join(str(tmp_path), "leviathan", "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cli.compile_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "leviathan", "jax")
    monkeypatch.setenv("LEVIATHAN_COMPILE_CACHE", str(tmp_path / "mine"))
    assert cli.compile_cache_dir() == str(tmp_path / "mine")
    for off in ("off", "0"):
        monkeypatch.setenv("LEVIATHAN_COMPILE_CACHE", off)
        assert cli.compile_cache_dir() is None


def test_end_on_ctrl_c_ends_the_process_with_one_sentence():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from machinery import cli; cli.end_on_ctrl_c('interrupted; nothing was lost'); print('ready', flush=True); " \
           "import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=here, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    start = time.perf_counter()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err == "error: interrupted; nothing was lost\n"
    assert time.perf_counter() - start < 10  # at once, not after the sleep
