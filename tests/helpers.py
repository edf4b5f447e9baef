"""Helpers the test modules share: running the scripts as a user would, and checking clean failures."""

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def run_script(script, *args, check=True, timeout=300, env=None, cwd=REPO):
    """Run one of the five scripts as a user would; returns the CompletedProcess."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def fails_cleanly(result, phrase):
    """Exit status 2, exactly one line on stderr containing `phrase`, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert phrase in lines[0] and "Traceback" not in result.stderr, lines[0]
    return lines[0]


# train_custom's settings: a 16-token window, batch 8, one epoch (a flag given again later wins)
CUSTOM_ARGS = ("--max_len", 16, "--batch_size", 8, "--num_epochs", 1)


def train_custom(data, out, *extra, check=False, **kw):
    """train_with_custom_dataset.py on `data` into `out`, with CUSTOM_ARGS."""
    return run_script("train_with_custom_dataset.py", "--dataset", data, "--output_dir", out, *CUSTOM_ARGS, *extra,
                      check=check, **kw)


def micro_denoiser(base_dir, corpus, **config):
    """(fresh untrained Denoiser with a 16-token window, tokenizer, TextData of the corpus) on a base folder."""
    import dlm_common as dlm

    base, tok, data, token_ids = micro_parts(str(base_dir), tuple(corpus))
    torch.manual_seed(0)
    model = dlm.build_model(dlm.DLMConfig(base_model=str(base_dir), max_len=16, **config), copy.deepcopy(base), tok,
                            token_ids)
    return model, tok, data


@functools.lru_cache(maxsize=None)
def micro_parts(base_dir, corpus):
    """(base, tokenizer, scanned TextData, its token ids), read once per test session: loading them
    is most of a fresh model's cost."""
    import dlm_common as dlm

    base, tok = dlm.load_base_model(base_dir), dlm.load_tokenizer(base_dir)
    data = dlm.TextData(list(corpus), tok, 16, dlm.end_of_text_id(tok))
    token_ids, _ = data.scan()
    return base, tok, data, token_ids


def run_main(script, *args):
    """Run one of the scripts inside this process, as `python script args` would run it (argument
    parsing, run_cli's error handling): returns (exit status, stderr). Much faster than run_script,
    for tests that check what a script says or saw rather than how a fresh process behaves."""
    import contextlib
    import io
    import runpy

    stderr, argv = io.StringIO(), sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stderr(stderr):
            runpy.run_path(str(REPO / script), run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return status, stderr.getvalue()


def end_of_text_logit(model, value):
    """A change for spy_forward: logits whose end-of-text entry is `value` (100: always chosen, -100: never)."""
    end = model.vocab_index(torch.tensor([model.config.end_id]))
    return lambda logits: logits.index_fill(-1, end, value)
