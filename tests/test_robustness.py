"""Bad input, interruptions and crashes never cost a model or show a traceback (CLI-level)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import dlm_common as dlm
from helpers import REPO, fails_cleanly, run_script, train_custom

pytestmark = pytest.mark.slow  # every test here runs the scripts as a user would


def custom_args(micro_base):
    return ("--base_model", micro_base)


# ------------------------------------------------------------- bad input: one line, exit 2, nothing written

def bad_dataset(tmp_path, kind):
    path = tmp_path / "data.txt"
    if kind == "missing":
        return tmp_path / "nope.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("")
    elif kind == "blank":
        path.write_text("\n   \n\t\n")
    elif kind == "latin1":
        path.write_bytes("The cat runs.\nThe caf\xe9 sleeps.\n".encode("latin-1"))
    return path


@pytest.mark.parametrize("kind,phrase", [
    ("missing", "no such file"),
    ("directory", "holds no data file"),
    ("empty", "no usable example"),
    ("blank", "no usable example"),
    ("latin1", "line 2 is not valid UTF-8"),
])
def test_bad_dataset(micro_base, tmp_path, kind, phrase):
    out = tmp_path / "model"
    fails_cleanly(train_custom(bad_dataset(tmp_path, kind), out, *custom_args(micro_base)), phrase)
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [
    ("--max_examples", "0"), ("--batch_size", "0"), ("--num_epochs", "-1"), ("--num_steps", "0"),
    ("--learning_rate", "0"), ("--learning_rate", "-0.001"), ("--max_len", "0"),
])
def test_bad_training_numbers(micro_base, data_file, tmp_path, flag, value):
    out = tmp_path / "model"
    line = fails_cleanly(train_custom(data_file, out, *custom_args(micro_base), flag, value), flag)
    assert "must be a positive" in line
    assert not out.exists()


@pytest.mark.parametrize("script,flag,value,phrase", [
    ("dlm_test.py", "--seq_len", "0", "must be a positive integer"),
    ("dlm_test.py", "--num_steps", "-5", "must be a positive integer"),
    ("view_diffusion.py", "--steps", "0", "must be a positive integer"),
    ("generate_with_prompt.py", "--guidance_scale", "-1", "must be zero or more"),
    pytest.param("dlm_test.py", "--device", "cuda", "no cuda device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("dlm_test.py", "--device", "mps", "no mps device is available",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    ("dlm_test.py", "--device", "tpu", "unknown --device"),
])
def test_bad_sampling_input(trained_dir, script, flag, value, phrase):
    extra = ("--prompt", "The cat") if script == "generate_with_prompt.py" else ()
    fails_cleanly(run_script(script, "--model_dir", trained_dir, *extra, flag, value, check=False), phrase)


def test_seq_len_above_the_models_window_is_a_note_not_an_error(trained_dir, tmp_path):
    """The seed's own command asks for --seq_len 40 from a model trained on 32 tokens: it runs, says
    the text ends within the model's window, and writes no more than that."""
    out = tmp_path / "samples.jsonl"
    r = run_script("dlm_test.py", "--model_dir", trained_dir, "--seq_len", 17, "--num_steps", 2, "--num_samples", 2,
                   "--output", out)
    assert "note: this model was trained on 16-token sequences" in r.stderr and "Traceback" not in r.stderr
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) == 2 and all(len(s["token_ids"]) <= 16 for s in samples)


def test_cuda_requested_for_training_without_one(micro_base, data_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "model"
    fails_cleanly(train_custom(data_file, out, *custom_args(micro_base), "--device", "cuda"), "no cuda device")
    assert not out.exists()


def test_model_dir_without_a_model(tmp_path):
    line = fails_cleanly(run_script("dlm_test.py", "--model_dir", tmp_path, check=False), "no trained model")
    assert "train one first with: python dlm_train.py" in line


@pytest.mark.parametrize("damage", ["truncate_weights", "garble_config", "delete_tokenizer"])
def test_damaged_checkpoint(trained_dir, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(trained_dir, broken)
    if damage == "truncate_weights":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garble_config":
        (broken / "config.json").write_text("{ not json")
    else:
        (broken / "tokenizer.json").unlink()
    fails_cleanly(run_script("dlm_test.py", "--model_dir", broken, "--seq_len", 8, check=False), "damaged or incomplete")


def test_unknown_base_model_offline(data_file, tmp_path):
    out = tmp_path / "model"
    line = fails_cleanly(train_custom(data_file, out, "--base_model", "Qwen/not-a-real-model"), "cannot be reached")
    assert "--base_model tiny" in line and not out.exists()


def test_resume_with_another_base_or_tokenizer(micro_base, data_file, model_dir, tmp_path):
    out = shutil.copytree(model_dir, tmp_path / "model")
    before = (out / "model.safetensors").read_bytes()
    fails_cleanly(train_custom(data_file, out, "--resume", "--base_model", "tiny"), "was trained with --base_model")
    # the same base path, but its tokenizer replaced by one with another vocabulary
    other = tmp_path / "other-base"
    shutil.copytree(micro_base, other)
    model2 = shutil.copytree(model_dir, tmp_path / "model2")  # as if trained from `other`
    config = json.loads((model2 / "config.json").read_text())
    (model2 / "config.json").write_text(json.dumps({**config, "base_model": str(other)}))
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["zzzz-new-token"] = 999999
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    fails_cleanly(train_custom(data_file, model2, "--resume", "--base_model", other), "another tokenizer")
    assert (out / "model.safetensors").read_bytes() == before


def test_existing_model_is_not_overwritten_by_accident(micro_base, data_file, model_dir, tmp_path):
    out = shutil.copytree(model_dir, tmp_path / "model")
    before = (out / "model.safetensors").read_bytes()
    fails_cleanly(train_custom(data_file, out, *custom_args(micro_base)), "already holds a trained model")
    assert (out / "model.safetensors").read_bytes() == before


def test_prompt_errors(trained_dir, tmp_path):
    fails_cleanly(run_script("generate_with_prompt.py", "--model_dir", trained_dir, check=False), "--prompt")
    long_prompt = " ".join(["the cat"] * 20)
    line = fails_cleanly(run_script("generate_with_prompt.py", "--model_dir", trained_dir, "--prompt", long_prompt,
                                    "--seq_len", 8, check=False), "leaves no room for a new token")
    assert "a longer --seq_len" in line  # 8 is less than the model's 16-token window
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    fails_cleanly(run_script("generate_with_prompt.py", "--model_dir", trained_dir, "--prompt_file", empty,
                             check=False), "no usable line")


def test_view_rejects_unknown_picture_format(trained_dir):
    fails_cleanly(run_script("view_diffusion.py", "--model_dir", trained_dir, "--save", "x.jpg", check=False),
                  ".png (picture) or .gif")


# ------------------------------------------------------------- crashes, interruptions, divergence

def test_recover_finishes_a_half_done_swap(trained_dir, tmp_path):
    """Killed between the two renames of a save: the target is gone, its backup remains."""
    target = tmp_path / "model"
    shutil.copytree(trained_dir, tmp_path / ".model.old")
    model, _ = dlm.load(target)
    assert target.exists() and not (tmp_path / ".model.old").exists()
    assert model.config.max_len == 16


@pytest.mark.parametrize("when", ["written", "swapping"])
def test_sigkill_during_save_keeps_the_previous_model(micro_base, data_file, model_dir, tmp_path, when):
    """Killed with the new model written beside the old one, or between the two renames: the folder
    holds the old model, byte for byte, not the new one (the next save clears what was left:
    test_model_files_follow_the_umask_and_stale_temporaries_go)."""
    out = shutil.copytree(model_dir, tmp_path / "model")
    before = (out / "model.safetensors").read_bytes()
    r = run_script("tests/die_in_save.py", when, "train_with_custom_dataset.py", "--dataset", data_file,
                   "--output_dir", out, "--resume", "--num_epochs", 2, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr
    leftovers = lambda: sorted(p.name for p in tmp_path.glob(".model.*") if not p.name.endswith(".lock"))
    new = [name for name in leftovers() if name.startswith(".model.tmp-")]  # the new model, written in full
    if when == "swapping":  # the old model moved aside, no model folder: load() finishes the swap backwards
        assert not out.exists() and leftovers() == sorted([".model.old", *new]) and len(new) == 1
    else:
        assert leftovers() == new and len(new) == 1
    assert (tmp_path / new[0] / "model.safetensors").read_bytes() != before  # the two can be told apart
    dlm.load(out)
    assert (out / "model.safetensors").read_bytes() == before
    assert json.loads((out / "trainer_state.json").read_text())["pos"]["epoch"] == 1


def test_sigint_then_resume_equals_an_uninterrupted_run(micro_base, data_file, tmp_path):
    args = ("--max_len", "16", "--batch_size", "4", "--num_epochs", "8", "--base_model", str(micro_base),
            "--learning_rate", "1e-3")
    straight = tmp_path / "straight"
    run_script("train_with_custom_dataset.py", "--dataset", data_file, "--output_dir", straight, *args)
    interrupted = tmp_path / "interrupted"
    trace = tmp_path / "trace"
    cmd = [sys.executable, str(REPO / "tests" / "traced.py"), str(trace), "train_with_custom_dataset.py", "--dataset",
           str(data_file), "--output_dir", str(interrupted), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rank0 = tmp_path / "trace.rank0"
    # wait until training is well under way (40 examples seen of 320), then press Ctrl-C
    while proc.poll() is None and (not rank0.exists() or len(rank0.read_text().splitlines()) < 40):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr and "Traceback" not in stderr
    stopped_at = json.loads((interrupted / "trainer_state.json").read_text())["pos"]["step"]
    assert 0 < stopped_at < 80
    # resume with no other flag: the checkpoint's own settings carry on
    run_script("train_with_custom_dataset.py", "--dataset", data_file, "--output_dir", interrupted, "--resume")
    a, b = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = [json.loads(line) for line in (interrupted / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 80


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(micro_base, data_file, model_dir, tmp_path):
    out = shutil.copytree(model_dir, tmp_path / "model")
    before = (out / "model.safetensors").read_bytes()
    r = train_custom(data_file, out, "--resume", "--num_epochs", "5", "--learning_rate", "1e30", "--save_every", "1000")
    assert r.returncode == 1 and "the loss became nan" in r.stderr.lower() and "Traceback" not in r.stderr
    assert (out / "model.safetensors").read_bytes() == before
    dlm.load(out)
