"""Print what a trained model writes.

    python sample.py runs/tiny-leviathan --prompt "The" --tokens 20 --seed 0
    python sample.py runs/tiny-dense --prompt "The" --tokens 100 --temperature 0.8 --top-k 50

RUN_DIR is a run folder of train.py: it reads params.npz (the parameters alone, with the Config and
the tokenizer's name), written beside every checkpoint. The same seed gives the same text.
"""

import argparse
import os
import sys

from machinery import cli  # no JAX in it: quick to load

if __name__ == "__main__":  # a Ctrl-C, even while JAX loads, ends in one sentence
    cli.end_on_ctrl_c("interrupted; sample.py writes no file, so nothing is lost")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import data  # noqa: E402
import leviathan as lv  # noqa: E402
from machinery.cli import UserError, number  # noqa: E402


def parse_args(argv=None):
    p = cli.OneLineParser(prog="sample.py", description="Print what a trained run writes.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="a run folder of train.py (it holds params.npz)")
    p.add_argument("--prompt", default="The", help="the text to continue ('': start a new document)")
    p.add_argument("--tokens", type=number(1), default=100, help="tokens to write")
    p.add_argument("--temperature", type=number(0, whole=False), default=1.0, help="0: greedy, higher: more random")
    p.add_argument("--top-k", type=number(0), default=200, help="draw from the k most likely (0: all)")
    p.add_argument("--seed", type=number(0), default=0, help="the same seed gives the same text")
    return p.parse_args(argv)


def load_run(run_dir):
    """(params, cfg, tokenizer) of a run folder's params.npz."""
    path = os.path.join(run_dir, "params.npz")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} holds no params.npz; give a run folder of train.py, which writes it "
                        "with every checkpoint")
    try:
        params, cfg, meta = lv.load_params(path)
    except Exception as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}); train the run again") from None
    return params, cfg, data.tokenizer(meta["tokenizer"])


def encode_prompt(enc, prompt):
    """The prompt's token ids; an empty prompt starts a new document (the end-of-text token)."""
    try:
        ids = enc.encode(prompt)
    except ValueError as e:  # a special token written as text, or text that is not valid Unicode
        reason = str(e).split(".")[0].replace("\n", " ")
        raise UserError(f"the {enc.name} tokenizer cannot encode the prompt ({reason}); change the prompt") from None
    return np.array(ids or [enc.eot_token], np.int32)


def main(argv=None):
    args = parse_args(argv)
    cli.use_compile_cache()
    try:
        params, cfg, enc = load_run(args.run)
        prompt = encode_prompt(enc, args.prompt)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    new = lv.sample(params, cfg, prompt, args.tokens, jax.random.key(args.seed), args.temperature,
                    top_k=min(args.top_k, cfg.vocab_size), n_valid=enc.n_vocab)
    print(args.prompt + enc.decode(np.asarray(new).tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
