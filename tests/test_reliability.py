"""Never lose a user's files or a finished run, and never end in a traceback after the work (CLI-level).

Each test here is a case that once lost data or ended in a traceback."""

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import dlm_common as dlm
from helpers import REPO, fails_cleanly, run_script, train_custom

pytestmark = pytest.mark.slow  # every test here runs the scripts as a user would


def copy_of(model_dir, tmp_path):
    return shutil.copytree(model_dir, tmp_path / "model")


def start_training(data_file, out, *extra, **popen):
    cmd = [sys.executable, str(REPO / "train_with_custom_dataset.py"), "--dataset", str(data_file),
           "--output_dir", str(out), "--max_len", "16", "--batch_size", "8", *map(str, extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(condition, proc, seconds=120):
    deadline = time.time() + seconds
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    assert condition(), "the trainer never got there"


def all_finite(path):
    return all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point())


# ------------------------------------------------------------- the severe cases: a user's files and a finished run

def test_a_users_folder_survives_output_dir(micro_base, data_file, tmp_path):
    keep = tmp_path / "keep"
    (keep / "sub").mkdir(parents=True)
    (keep / "notes.txt").write_text("x")
    (keep / "sub" / "more.txt").write_text("y")
    fails_cleanly(train_custom(data_file, keep, "--base_model", micro_base), "not part of a DLM model")
    fails_cleanly(train_custom(data_file, keep, "--base_model", micro_base, "--overwrite"), "not part of a DLM model")
    assert sorted(str(p.relative_to(keep)) for p in keep.rglob("*")) == ["notes.txt", "sub", "sub/more.txt"]
    assert (keep / "notes.txt").read_text() == "x"


@pytest.mark.parametrize("target", ["projects", "above projects"])
def test_the_projects_cache_is_refused(micro_base, data_file, target):
    dlm.PROJECTS_DIR.mkdir(parents=True, exist_ok=True)
    (dlm.PROJECTS_DIR / "README.md").write_text("the cache")
    before = sorted(p.name for p in dlm.PROJECTS_DIR.iterdir())
    out = {"projects": dlm.PROJECTS_DIR, "above projects": dlm.PROJECTS_DIR.parent}[target]
    fails_cleanly(train_custom(data_file, out, "--base_model", micro_base, "--overwrite"), "projects cache")
    assert sorted(p.name for p in dlm.PROJECTS_DIR.iterdir()) == before


def test_the_working_folder_is_refused(micro_base, data_file, tmp_path):
    (tmp_path / "notes.txt").write_text("x")  # run from a throwaway folder: were it not refused, it would go
    r = run_script("train_with_custom_dataset.py", "--dataset", data_file, "--output_dir", ".", "--max_len", 16,
                   "--base_model", micro_base, "--overwrite", check=False, cwd=tmp_path)
    fails_cleanly(r, "not part of a DLM model")
    assert (tmp_path / "notes.txt").read_text() == "x"


def test_an_empty_folder_is_a_fine_output_dir(micro_base, data_file, tmp_path):
    (tmp_path / "empty").mkdir()
    train_custom(data_file, tmp_path / "empty", "--base_model", micro_base, check=True)
    dlm.load(tmp_path / "empty")


def test_a_base_model_folder_is_refused_as_output_dir(micro_base, data_file, tmp_path):
    base = shutil.copytree(micro_base, tmp_path / "base")
    fails_cleanly(train_custom(data_file, base, "--base_model", micro_base, "--overwrite"), "holds a base model")
    assert sorted(p.name for p in base.iterdir()) == sorted(p.name for p in micro_base.iterdir())


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_final_save_keeps_the_finished_model(micro_base, data_file, tmp_path, signum, status):
    out = tmp_path / "model"
    proc = start_training(data_file, out, "--base_model", micro_base, "--num_epochs", 2)
    wait_for(lambda: list(tmp_path.glob(".model.tmp-*")), proc)  # the only save is the final one
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == status, stderr
    assert "the finished model was saved" in stderr and "Traceback" not in stderr and "error:" not in stderr
    assert not list(tmp_path.glob(".model.*"))  # no temporary folder, no lock
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["pos"]["step"] == 10  # 40 examples in batches of 8, twice: the whole run
    dlm.load(out)


@pytest.mark.parametrize("rate", ["1e10", "1e30"])  # 1e10 once left 31 NaN tensors saved
def test_a_learning_rate_that_blows_up_never_writes_a_non_finite_checkpoint(micro_base, data_file, tmp_path, rate):
    out = tmp_path / "model"
    r = train_custom(data_file, out, "--base_model", micro_base, "--learning_rate", rate, "--save_every", 1,
                     "--num_epochs", 3)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert any(word in r.stderr for word in ("nan", "inf", "NaN")), r.stderr
    for weights in tmp_path.rglob("*.safetensors"):
        assert all_finite(weights), weights
    if out.exists():
        assert dlm.load(out)


def test_a_second_training_into_the_same_folder_stops_at_once(micro_base, data_file, tmp_path):
    out = tmp_path / "model"
    first = start_training(data_file, out, "--base_model", micro_base, "--num_epochs", 1000, "--save_every", 5)
    wait_for(lambda: (out / "config.json").exists(), first)  # training, not still loading
    second = train_custom(data_file, out, "--base_model", micro_base, "--overwrite")
    fails_cleanly(second, "another training is writing to")
    first.send_signal(signal.SIGINT)
    stderr = first.communicate(timeout=120)[1]
    assert first.returncode == 130, stderr
    assert json.loads((out / "config.json").read_text())["max_len"] == 16 and not (tmp_path / ".model.lock").exists()


# ------------------------------------------------------------- outputs checked before the work

@pytest.mark.parametrize("case,phrase", [
    ("missing folder", "cannot write there"), ("read-only", "cannot write there"), ("directory", "is a folder")])
def test_output_paths_are_checked_before_sampling(model_dir, tmp_path, case, phrase):
    (tmp_path / "d.png").mkdir()
    path = {"missing folder": tmp_path / "nope" / "s.jsonl", "read-only": "/proc/dlm-samples.jsonl",
            "directory": tmp_path / "d.png"}[case]
    fails_cleanly(run_script("dlm_test.py", "--model_dir", model_dir, "--output", path, check=False), phrase)
    fails_cleanly(run_script("generate_with_prompt.py", "--model_dir", model_dir, "--prompt", "The", "--output", path,
                             check=False), phrase)
    save = str(path).replace(".jsonl", ".png")
    fails_cleanly(run_script("view_diffusion.py", "--model_dir", model_dir, "--save", save, check=False), phrase)


def test_view_diffusion_save_needs_a_file_name(model_dir):
    fails_cleanly(run_script("view_diffusion.py", "--model_dir", model_dir, "--save", ".png", check=False),
                  ".png (picture) or .gif")


@pytest.mark.parametrize("case", ["read-only", "under a file"])
def test_output_dir_that_cannot_be_written(micro_base, data_file, tmp_path, case):
    out = "/proc/dlm-model" if case == "read-only" else tmp_path / "file.txt" / "model"
    (tmp_path / "file.txt").write_text("x")
    fails_cleanly(train_custom(data_file, out, "--base_model", micro_base), "cannot write to")


def test_output_dir_that_is_a_file(micro_base, data_file, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    fails_cleanly(train_custom(data_file, tmp_path / "file.txt", "--base_model", micro_base), "is a file")
    assert (tmp_path / "file.txt").read_text() == "x"


def limit_file_size():
    """In the child: files larger than 1 MB cannot be written (EFBIG, as a full disk gives ENOSPC)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_full_disk_at_save_time_keeps_the_previous_model(model_dir, data_file, tmp_path):
    out = copy_of(model_dir, tmp_path)
    before = (out / "model.safetensors").read_bytes()
    cmd = [sys.executable, str(REPO / "train_with_custom_dataset.py"), "--dataset", str(data_file), "--output_dir",
           str(out), "--resume", "--num_epochs", "2"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    assert r.returncode == 1 and "could not save to" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".model.tmp-*"))


def test_a_read_only_projects_folder_is_one_clear_error(data_file, tmp_path):
    r = train_custom(data_file, tmp_path / "model", "--base_model", "tiny", env={"DLM_PROJECTS": "/proc/dlm-projects"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "set DLM_PROJECTS to a writable folder" in r.stderr.strip().splitlines()[-1]


def test_a_reader_that_closes_the_pipe_early(model_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    cmd = (f"'{sys.executable}' dlm_test.py --model_dir '{model_dir}' --num_samples 5 --num_steps 2 --seq_len 8 "
           f"--output '{out}' | true")
    r = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in r.stderr and "Exception" not in r.stderr, r.stderr
    assert len(out.read_text().splitlines()) == 5


# ------------------------------------------------------------- what --resume checks

def test_resume_without_training_state_is_refused(model_dir, data_file, tmp_path):
    out = copy_of(model_dir, tmp_path)
    (out / "trainer_state.json").unlink()
    (out / "train_state.safetensors").unlink()
    fails_cleanly(train_custom(data_file, out, "--resume"), "no training state")


@pytest.mark.parametrize("damage", ["no log", "garbled state", "truncated tensors"])
def test_a_damaged_training_state_is_one_clear_error(model_dir, data_file, tmp_path, damage):
    out = copy_of(model_dir, tmp_path)
    if damage == "no log":
        (out / "train_log.jsonl").unlink()
    elif damage == "garbled state":
        (out / "trainer_state.json").write_text("{ not json")
    else:
        tensors = out / "train_state.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:100])
    fails_cleanly(train_custom(data_file, out, "--resume"), "training state")


def stop_mid_epoch(out):
    """Make a checkpoint look as if its run had stopped after two of an epoch's five batches."""
    state = json.loads((out / "trainer_state.json").read_text())
    state["pos"].update(epoch=0, micro=2, step=2)
    (out / "trainer_state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("flag,value", [("--batch_size", 4), ("--seed", 7), ("--grad_accum", 2)])
def test_resume_mid_epoch_keeps_the_data_order(model_dir, data_file, tmp_path, flag, value):
    out = copy_of(model_dir, tmp_path)
    stop_mid_epoch(out)
    line = fails_cleanly(train_custom(data_file, out, "--resume", flag, value), "middle of an epoch")
    assert flag in line


def test_resume_mid_epoch_on_changed_data_is_refused(model_dir, data_file, tmp_path):
    out = copy_of(model_dir, tmp_path)
    stop_mid_epoch(out)
    other = tmp_path / "other.txt"
    other.write_text("\n".join(dlm.builtin_corpus(40, seed=4)) + "\n")
    fails_cleanly(train_custom(other, out, "--resume"), "not what")


def test_data_rewritten_during_training_stops_the_run(micro_base, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("\n".join(dlm.builtin_corpus(40, seed=3)) + "\n")
    out = tmp_path / "model"
    proc = start_training(data, out, "--base_model", micro_base, "--num_epochs", 1000, "--save_every", 5)
    wait_for(lambda: (out / "config.json").exists(), proc)
    data.write_text("\n".join(["Zebras quarrel about quantum electrodynamics."] * 40) + "\n")
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and "changed during training" in stderr and "Traceback" not in stderr, stderr


# ------------------------------------------------------------- model files: checked on load, written like any file

@pytest.mark.parametrize("field,value", [("vocab_size", "abc"), ("vocab_size", -1), ("max_len", "16"),
                                         ("num_steps", 0), ("self_cond_prob", 2.0), ("surprise", 1)])
def test_a_hand_edited_config_is_one_clear_error(model_dir, tmp_path, field, value):
    out = copy_of(model_dir, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config[field] = value
    (out / "config.json").write_text(json.dumps(config))
    line = fails_cleanly(run_script("dlm_test.py", "--model_dir", out, "--num_steps", 2, check=False), "damaged")
    assert field in line


def test_vocab_ids_out_of_range_are_one_clear_error(model_dir, tmp_path):
    out = copy_of(model_dir, tmp_path)
    weights = load_file(out / "model.safetensors")
    weights["vocab_ids"][-1] = 10 ** 9
    save_file(weights, out / "model.safetensors")
    fails_cleanly(run_script("dlm_test.py", "--model_dir", out, "--num_steps", 2, check=False), "vocab_ids")


def test_model_files_follow_the_umask_and_stale_temporaries_go(micro_base, data_file, tmp_path):
    stale, live = tmp_path / ".model.tmp-999999999", tmp_path / f".model.tmp-{os.getpid()}"
    (stale / "sub").mkdir(parents=True)
    live.mkdir()
    train_custom(data_file, tmp_path / "model", "--base_model", micro_base, check=True)
    assert not stale.exists() and live.exists()  # a dead process's leftovers go, a live one's stay
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "model").rglob("*"):
        assert stat.S_IMODE(f.stat().st_mode) == (0o777 if f.is_dir() else 0o666) & ~umask, f


# ------------------------------------------------------------- messages that point the right way

def test_model_dir_at_a_base_model(micro_base):
    fails_cleanly(run_script("dlm_test.py", "--model_dir", micro_base, check=False), "is a base model")


def test_base_model_at_a_missing_directory(data_file, tmp_path):
    line = fails_cleanly(train_custom(data_file, tmp_path / "m", "--base_model", "/nonexistent/dir"),
                         "no such directory")
    assert "Hub" not in line


def test_a_base_model_with_only_pickled_weights(micro_base, data_file, tmp_path):
    base = tmp_path / "pickled"
    base.mkdir()
    for f in micro_base.iterdir():
        if f.suffix != ".safetensors":
            (base / f.name).write_bytes(f.read_bytes())
    torch.save({"x": torch.zeros(1)}, base / "pytorch_model.bin")
    fails_cleanly(train_custom(data_file, tmp_path / "m", "--base_model", base), "only pickled weights")


@pytest.mark.parametrize("kind,phrase", [("fifo", "not a regular file"), ("-", "standard input")])
def test_dataset_that_is_not_a_regular_file(micro_base, tmp_path, kind, phrase):
    path = tmp_path / "fifo"
    if kind == "fifo":
        os.mkfifo(path)
    fails_cleanly(train_custom(path if kind == "fifo" else "-", tmp_path / "m", "--base_model", micro_base), phrase)


def test_a_prompt_longer_than_the_window_asks_for_a_shorter_prompt(model_dir):
    long_prompt = " ".join(["the cat"] * 20)
    line = fails_cleanly(run_script("generate_with_prompt.py", "--model_dir", model_dir, "--prompt", long_prompt,
                                    "--seq_len", 16, check=False), "shorter prompt")
    assert "--seq_len" not in line and "window" in line


@pytest.mark.parametrize("script,flag,value,phrase", [
    ("dlm_test.py", "--device", "cpu:abc", "not a device name"),
    ("dlm_test.py", "--seed", str(2 ** 64), "must be between"),
    ("train_with_custom_dataset.py", "--seed", "-1", "must be between"),
    ("train_with_custom_dataset.py", "--save_every", "-1", "must be zero or more"),
])
def test_bad_numbers_and_names(model_dir, data_file, tmp_path, script, flag, value, phrase):
    extra = ("--model_dir", model_dir) if script == "dlm_test.py" else ("--dataset", data_file, "--output_dir",
                                                                          tmp_path / "m")
    fails_cleanly(run_script(script, *extra, flag, value, check=False), phrase)


def test_max_len_beyond_the_bases_positions(micro_base, data_file, tmp_path):
    fails_cleanly(train_custom(data_file, tmp_path / "m", "--base_model", micro_base, "--max_len", 40000),
                  "positions")


def test_a_tiny_temperature_is_the_argmax_not_nan(model_dir, tmp_path):
    """--temperature 1e-45 gives the samples of any other tiny temperature, not NaN."""
    out = tmp_path / "samples.jsonl"
    run_script("dlm_test.py", "--model_dir", model_dir, "--num_samples", 4, "--num_steps", 3, "--seq_len", 16,
               "--temperature", "1e-45", "--output", out)
    model, tok = dlm.load(model_dir)
    other = dlm.generate(model, tok, [""], num_samples=4, seq_len=16, cfg=dlm.SampleConfig(num_steps=3, temperature=1e-30))
    assert [json.loads(line)["token_ids"] for line in out.read_text().splitlines()] == [s["token_ids"] for s in other]


def test_lora_r_without_lora_is_refused(micro_base, data_file, tmp_path):
    fails_cleanly(train_custom(data_file, tmp_path / "m", "--base_model", micro_base, "--lora_r", 4), "add --lora")


# ------------------------------------------------------------- interruptions read as news, with the shell's status

def test_sigterm_saves_and_exits_143_on_a_line_of_its_own(micro_base, data_file, tmp_path):
    out = tmp_path / "model"
    proc = start_training(data_file, out, "--base_model", micro_base, "--num_epochs", 1000, "--save_every", 5)
    wait_for(lambda: (out / "config.json").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr
    assert any(line.startswith("interrupted at step") for line in stderr.splitlines()), stderr
    assert "error:" not in stderr
    dlm.load(out)


def test_a_short_run_reaches_its_learning_rate(micro_base, data_file, tmp_path):
    """The 100-step warm-up ends by a tenth of the run: a 5-step run is not all warm-up."""
    out = tmp_path / "model"
    train_custom(data_file, out, "--base_model", micro_base, "--learning_rate", "1e-3", check=True)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 5 and log[-1]["lr"] > 1e-4  # cosine-decayed by step 5 of 5, but not 20x lower



@pytest.mark.parametrize("lora", [(), ("--lora", "--lora_r", 4)], ids=["full", "lora"])
def test_keep_checkpoints_keeps_the_last_saves_each_whole_and_resumable(micro_base, data_file, tmp_path, lora):
    from helpers import run_main

    out = tmp_path / "model"
    flags = ("--dataset", data_file, "--base_model", micro_base, "--max_len", 16, "--batch_size", 8, *lora)
    status, err = run_main("train_with_custom_dataset.py", *flags, "--num_epochs", 3, "--save_every", 4,
                           "--keep_checkpoints", 2, "--output_dir", out)
    assert status == 0, err
    # 15 steps: saves at 4, 8, 12 and the last one at 15; the last two are kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-15"]
    latest, earlier = out / "checkpoint-15", out / "checkpoint-12"
    assert (latest / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert os.stat(latest / "model.safetensors").st_ino == os.stat(out / "model.safetensors").st_ino  # no copy
    assert json.loads((earlier / "trainer_state.json").read_text())["pos"]["step"] == 12
    assert not list(earlier.glob("checkpoint-*"))
    dlm.load(earlier)
    # the earlier one resumes to the same model as the run that went on
    resumed = shutil.copytree(earlier, tmp_path / "resumed")
    status, err = run_main("train_with_custom_dataset.py", "--dataset", data_file, "--resume", "--output_dir", resumed)
    assert status == 0, err
    for weights in ["model.safetensors"] + ["adapter_model.safetensors"] * bool(lora):
        a, b = load_file(out / weights), load_file(resumed / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    # and the folder, checkpoints and all, is still one a trainer may replace
    status, err = run_main("train_with_custom_dataset.py", *flags, "--num_epochs", 1, "--output_dir", out, "--overwrite")
    assert status == 0, err
    assert not list(out.glob("checkpoint-*"))
