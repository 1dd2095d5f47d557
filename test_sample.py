"""sample.py: the same seed prints the same text; its errors are one sentence, a Ctrl-C too."""

import signal
import time

import jax
import pytest

import leviathan as lv
import sample
from conftest import BYTES, small_config, start


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """A run folder holding only params.npz, with the byte tokenizer."""
    run = tmp_path_factory.mktemp("sample_run")
    cfg = small_config(vocab_size=BYTES.n_vocab, seq_len=8)
    lv.save_params(str(run / "params.npz"), lv.init_params(jax.random.key(0), cfg), cfg, step=1, tokenizer="bytes")
    return run


def test_sample_py_prints_the_same_text_for_the_same_seed(sample_run, capsys):
    outputs = []
    for _ in range(2):
        assert sample.main([str(sample_run), "--prompt", "The", "--tokens", "10", "--seed", "0"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("The") and len(outputs[0]) > 4


@pytest.mark.parametrize("case", ["no run", "prompt"])
def test_sample_py_errors_are_one_sentence(case, sample_run, tmp_path, capsys):
    argv, named = {"no run": ([str(tmp_path)], "holds no params.npz"),
                   "prompt": ([str(sample_run), "--prompt", "a <|endoftext|> b"], "cannot encode the prompt")}[case]
    assert sample.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err


@pytest.mark.slow
def test_sample_py_ctrl_c_while_jax_loads_is_one_sentence(sample_run, env):
    proc = start([str(sample_run), "--tokens", "2000"], env, script="sample.py")
    time.sleep(0.5)  # importing JAX takes seconds
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "error: interrupted; sample.py writes no file, so nothing is lost\n", err
