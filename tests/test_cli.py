"""The five scripts end to end, as a user runs them, plus the seed README's flags and defaults."""

import json

import pytest
import torch

import dlm_common as dlm
from helpers import REPO, run_main, run_script

pytestmark = pytest.mark.slow  # every test here runs the scripts as a user would


def test_train_writes_a_complete_checkpoint(trained_dir):
    names = {p.name for p in trained_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_dlm.py", "tokenizer.json", "tokenizer_config.json",
            "train_log.jsonl", "trainer_state.json"} <= names
    config = json.loads((trained_dir / "config.json").read_text())
    assert config["num_steps"] == 1000 and config["max_len"] == 16 and config["vocab"] == "data"


def test_dlm_test_prints_and_writes_jsonl(trained_dir, tmp_path):
    out = tmp_path / "samples.jsonl"
    r = run_script("dlm_test.py", "--model_dir", trained_dir, "--num_samples", 3, "--num_steps", 5,
                   "--seq_len", 16, "--output", out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all({"text", "token_ids"} <= set(r) for r in records)
    assert r.stdout.splitlines() == [rec["text"] for rec in records]


def test_dlm_test_show_steps_every_interval(trained_dir):
    r = run_script("dlm_test.py", "--model_dir", trained_dir, "--num_steps", 10, "--step_interval", 5,
                   "--seq_len", 16, "--show_steps")
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("step ")] == ["5/10", "10/10"]


def test_same_seed_same_samples(trained_dir, tmp_path):
    """The script's samples are the ones generate() gives with the same seed and settings."""
    run_script("dlm_test.py", "--model_dir", trained_dir, "--num_samples", 4, "--num_steps", 5, "--seq_len", 16,
               "--seed", 1, "--output", tmp_path / "a.jsonl")
    model, tok = dlm.load(trained_dir)
    again = dlm.generate(model, tok, [""], num_samples=4, seq_len=16, cfg=dlm.SampleConfig(num_steps=5), seed=1)
    assert [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()] == \
        [{"text": s["text"], "token_ids": s["token_ids"]} for s in again]


def test_custom_dataset_end_to_end(micro_base, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("\n".join(["Anna has one apple.", "", "Tom has two apples."] * 10), encoding="utf-8")
    out = tmp_path / "custom"
    r = run_script("train_with_custom_dataset.py", "--dataset", data, "--base_model", micro_base, "--batch_size", 8,
                   "--num_epochs", 1, "--max_examples", 12, "--output_dir", out)
    # without --max_len, the window is the longest example plus its end-of-text, and the trainer says so
    encoded = dlm.load_tokenizer(str(micro_base))(["Anna has one apple.", "Tom has two apples."], add_special_tokens=False)
    window = max(map(len, encoded["input_ids"])) + 1
    assert f"12 examples in a {window}-token window" in r.stderr and "cut" not in r.stderr
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and log[-1]["step"] == 2 and log[-1]["loss"] > 0  # 12 examples in batches of 8
    config = json.loads((out / "config.json").read_text())
    assert config["max_len"] == window and config["vocab_size"] <= 12  # those two sentences' ids and end-of-text
    r = run_script("dlm_test.py", "--model_dir", out, "--num_steps", 3, "--seq_len", 8, "--num_samples", 2)
    assert len(r.stdout.splitlines()) == 2


def test_train_reports_cut_lines(micro_base, tmp_path):
    data = tmp_path / "long.txt"
    data.write_text("one two three four five six seven eight nine ten\nshort\n", encoding="utf-8")
    r = run_script("train_with_custom_dataset.py", "--dataset", data, "--base_model", micro_base, "--num_epochs", 1,
                   "--max_len", 4, "--output_dir", tmp_path / "m")
    assert "1 of 2 examples were longer than --max_len 4 tokens" in r.stderr


# The seed README's flags for each script, with the defaults it states.
SEED_FLAGS = {
    "dlm_train.py": {"--num_steps": "1000", "--batch_size": "4", "--learning_rate": "0.0001", "--num_epochs": "3",
                     "--device": None},
    "train_with_custom_dataset.py": {"--dataset": None, "--max_examples": None, "--num_steps": "1000",
                                     "--batch_size": "4", "--learning_rate": "0.0001", "--num_epochs": "3",
                                     "--device": None},
    "dlm_test.py": {"--seq_len": "32", "--show_steps": None, "--step_interval": "100", "--num_steps": None,
                    "--device": None},
    "generate_with_prompt.py": {"--prompt": None, "--seq_len": "40", "--guidance_scale": "5.0", "--num_steps": None,
                                "--step_interval": "10", "--device": None},
    "view_diffusion.py": {"--steps": "20", "--seq_len": "8", "--device": "cpu"},
}


def help_entries(script):
    """{flag: its help text} from the options section of `script --help`."""
    entries, current = {}, None
    options = run_script(script, "--help").stdout.split("options:", 1)[1]
    for line in options.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current:
            entries[current] += " " + line.strip()
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


@pytest.mark.parametrize("script", sorted(SEED_FLAGS))
def test_seed_flags_exist_with_seed_defaults(script):
    entries = help_entries(script)
    for flag, default in SEED_FLAGS[script].items():
        assert flag in entries, f"{script} lacks {flag}"
        if default is not None:
            assert f"(default: {default})" in entries[flag], f"{script} {flag}: {entries[flag]}"


def test_the_readmes_python_example_runs(trained_dir, capsys):
    """The README's "Use from Python" example, as written, on a trained model."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Use from Python"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("```\n", start)]
    assert 'dlm.load("projects/diffusion_model")' in code
    exec(compile(code.replace('"projects/diffusion_model"', repr(str(trained_dir))), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    completions = [line for line in lines if " -> " in line]
    assert len(completions) == 2 and all(line.startswith("The dogs near the cat ->") for line in completions)
    steps = [line.split(":")[0] for line in lines if line.startswith("step ")]
    assert steps and steps[0] == "step 1/20"  # the callback ran (sampling may stop before step 20)


def test_bfloat16_weights_take_half_the_memory_and_sample_like_float32(trained_dir, tmp_path):
    model, tokenizer = dlm.load(trained_dir)
    half, _ = dlm.load(trained_dir, dtype=torch.bfloat16)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    assert half.head.weight.dtype == torch.bfloat16 and half.vocab_ids.dtype == torch.long
    assert 2 * size(half) == size(model)
    cfg = dlm.SampleConfig(num_steps=10)
    ids = [[s["token_ids"] for s in dlm.generate(m, tokenizer, [""] * 32, seq_len=16, cfg=cfg, seed=0)]
           for m in (model, half)]
    positions = sum(max(len(a), len(b)) for a, b in zip(*ids))
    same = sum(x == y for a, b in zip(*ids) for x, y in zip(a, b))
    assert same / positions >= 0.7  # measured: 1.0 here; 94% on a grammar model (NOTES row 63)
    status, stderr = run_main("dlm_test.py", "--model_dir", trained_dir, "--dtype", "bfloat16", "--num_steps", 3)
    assert status == 0, stderr
    status, stderr = run_main("dlm_test.py", "--model_dir", trained_dir, "--dtype", "float16", "--device", "cpu")
    assert status == 2 and "--dtype float16 is for GPUs" in stderr and len(stderr.strip().splitlines()) == 1
