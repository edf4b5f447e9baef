"""A saved folder as a Hugging Face model: AutoModel.from_pretrained(folder, trust_remote_code=True)
and diffusion_generate, without this repository; and the folders saved before that still load."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import dlm_common as dlm
from helpers import micro_denoiser, run_main

PROMPTS = ["the cat", "a dog sees"]
SAMPLING = dict(num_steps=8, guidance_scale=2.0)

# Run in a fresh process, from another folder, with nothing of this repository on its path.
FRESH = """
import json, sys, torch
from transformers import AutoModel, AutoTokenizer
folder, prompts, sampling, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
batch = tokenizer(prompts, return_tensors="pt", padding=True)
steps = []
ids = model.diffusion_generate(batch.input_ids, batch.attention_mask, max_length=16, num_return_sequences=3,
                               steps=sampling["num_steps"], guidance_scale=sampling["guidance_scale"],
                               callback=steps.append, generator=torch.Generator().manual_seed(3))
free = model.diffusion_generate(num_return_sequences=2, steps=4, generator=torch.Generator().manual_seed(0))
model.save_pretrained(out)
tokenizer.save_pretrained(out)
repo = [name for name in sys.modules if name.split(".")[-1] in ("dlm_common", "modeling_dlm") and
        not name.startswith("transformers_modules")]
print(json.dumps(dict(ids=ids.tolist(), free=list(free.shape), steps=len(steps), type=type(model).__name__,
                      repo=repo)))
"""


@pytest.fixture(scope="module", params=[0, 4], ids=["bidirectional", "blocks"])
def saved(request, micro_base, corpus, tmp_path_factory):
    """A micro model (with blocks of 4, their last tokens folded, or without blocks) trained for a few
    steps and saved by dlm.save."""
    model, tok, data = micro_denoiser(micro_base, corpus, block_size=request.param, fold_last=request.param > 0)
    dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=3e-3, num_epochs=1))
    folder = tmp_path_factory.mktemp("hf") / "model"
    dlm.save(model, tok, folder)
    return folder


def expected_ids(folder):
    """The token ids dlm.load + generate give, each up to its end-of-text."""
    model, tok = dlm.load(folder)
    samples = dlm.generate(model, tok, PROMPTS, num_samples=3, seq_len=16, cfg=dlm.SampleConfig(**SAMPLING), seed=3)
    return [s["token_ids"] for s in samples]


def fresh_process(code, *args, tmp_path):
    """Run `code` in a new Python, in tmp_path, with neither this repository nor the Hub in reach."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)


@pytest.mark.slow
def test_automodel_in_a_fresh_process_samples_what_dlm_samples(saved, tokenizer, tmp_path):
    want = expected_ids(saved)
    r = fresh_process(FRESH, saved, json.dumps(PROMPTS), json.dumps(SAMPLING), tmp_path / "resaved", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["type"] == "DiffusionLM" and got["repo"] == []
    # diffusion_generate returns whole windows: cut each after the prompt's end-of-text, as generate does
    end_id = dlm.end_of_text_id(tokenizer)
    n_prompt = [len(ids) for ids in tokenizer(PROMPTS).input_ids for _ in range(3)]
    got_ids = [row[: row.index(end_id, n)] if end_id in row[n:] else row for row, n in zip(got["ids"], n_prompt)]
    assert got_ids == want
    assert got["free"] == [2, 16] and got["steps"] > 0
    # what save_pretrained wrote loads in this repository too, and samples the same
    assert expected_ids(tmp_path / "resaved") == want


@pytest.mark.slow
def test_folders_saved_before_the_transformers_layout_still_load(saved, tmp_path):
    """Until 2026-11-29 the tokenizer sat in tokenizer/, config.json held only DLM's fields, and
    there was no modeling_dlm.py."""
    old = shutil.copytree(saved, tmp_path / "old")
    (old / "modeling_dlm.py").unlink()
    (old / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (old / name).exists():
            (old / name).rename(old / "tokenizer" / name)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in dlm.TRANSFORMERS_KEYS}))
    assert expected_ids(old) == expected_ids(saved)


def test_config_json_names_the_model_code_and_every_field(saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "dlm" and config["auto_map"]["AutoModel"] == "modeling_dlm.DiffusionLM"
    assert set(dlm.own_fields(dlm.DLMConfig)) <= set(config)  # defaults included
    assert (saved / "modeling_dlm.py").read_text() == (dlm.REPO_DIR / "modeling_dlm.py").read_text()


@pytest.mark.slow
def test_automodel_without_trust_remote_code_says_so(saved, tmp_path):
    code = "import sys; from transformers import AutoModel; AutoModel.from_pretrained(sys.argv[1])"
    r = fresh_process(code, saved, tmp_path=tmp_path)
    assert r.returncode != 0 and "trust_remote_code=True" in r.stderr


def test_a_dlm_folder_as_base_model_says_what_it_is(saved, data_file, tmp_path):
    status, err = run_main("train_with_custom_dataset.py", "--dataset", data_file, "--base_model", saved,
                           "--output_dir", tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "trained diffusion model" in err
    assert not (tmp_path / "out").exists()


def test_a_base_with_its_own_code_is_refused(data_file, tmp_path):
    base = tmp_path / "custom-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "my-model", "auto_map": {"AutoConfig": "x.MyConfig"}}))
    status, err = run_main("train_with_custom_dataset.py", "--dataset", data_file, "--base_model", base,
                           "--output_dir", tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "needs trust_remote_code" in err


@pytest.mark.slow
def test_the_readmes_transformers_example_runs_without_this_repository(trained_dir, tmp_path):
    readme = (dlm.REPO_DIR / "README.md").read_text()
    section = readme[readme.index("### Without this repository"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("```\n", start)]
    assert "AutoModel.from_pretrained(folder, trust_remote_code=True)" in code
    code = code.replace('"projects/diffusion_model"', repr(str(trained_dir))) + "\nprint(unconditional.shape)\n"
    r = fresh_process(code, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    decoded, shape = r.stdout.strip().splitlines()[-2:]
    assert decoded.startswith("['The dogs near the cat") and shape == "torch.Size([3, 16])"
