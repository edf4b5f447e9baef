"""Real data in: every format --dataset takes, packing, prompt/completion and chat rows, held-out
evaluation, and bad input (one line, exit 2, nothing written).

The trainers run inside this process (helpers.run_main) on the micro base; they still load a
tokenizer and a base and save a model, so those tests are marked slow. Every batch the loss is
given is recorded, so that each test asserts what the model saw: its windows, which
positions are a clean prompt, and which positions the loss covers.
"""

import json

import pytest
import torch
import torch.nn.functional as F

import dlm_common as dlm
from helpers import CUSTOM_ARGS, run_main

TEXTS = ["The cat runs.", "Some dogs sleep quietly.", "A bird sings again.", "The old king waits.", "Many girls smile."]
FORMATS = ["d.txt", "d.jsonl", "d.json", "d.parquet", "d.csv", "folder", "saved"]
WINDOW = 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """TEXTS in every format, the rows' text under the field "body"; pairs and chat rows beside them."""
    datasets = dlm.quiet_datasets()
    root = tmp_path_factory.mktemp("formats")
    rows = [{"body": text, "n": i} for i, text in enumerate(TEXTS)]
    jsonl = lambda rows: "".join(json.dumps(row) + "\n" for row in rows)
    (root / "d.txt").write_text("\n".join(TEXTS) + "\n\n")
    (root / "d.jsonl").write_text(jsonl(rows))
    (root / "d.json").write_text(json.dumps(rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(root / "d.parquet"))
    table.to_csv(str(root / "d.csv"), index=False)
    (root / "folder").mkdir()
    (root / "folder" / "a.jsonl").write_text(jsonl(rows[:2]))
    (root / "folder" / "b.jsonl").write_text(jsonl(rows[2:]))
    (root / "folder" / "README.md").write_text("not data")
    datasets.DatasetDict(train=table, test=table.select([0])).save_to_disk(str(root / "saved"))
    (root / "pairs.jsonl").write_text(jsonl([{"prompt": f"Say {i}:", "completion": " " + text}
                                             for i, text in enumerate(TEXTS)] + [{"prompt": "Say x:", "completion": " "}]))
    (root / "chat.jsonl").write_text(jsonl([{"messages": [{"role": "user", "content": f"Say {i}"},
                                                          {"role": "assistant", "content": text}]}
                                            for i, text in enumerate(TEXTS)]))
    return root


@pytest.fixture
def seen(monkeypatch):
    """Every (ids, n_prompt) row diffusion_loss is given, as lists."""
    rows, loss = [], dlm.diffusion_loss

    def recording(model, ids, generator=None, net=None, n_prompt=None):
        rows.extend(zip(ids.tolist(), n_prompt.tolist()))
        return loss(model, ids, generator, net, n_prompt)

    monkeypatch.setattr(dlm, "diffusion_loss", recording)
    return rows


def train(micro_base, dataset, out, *flags):
    """train_with_custom_dataset.py in this process, with CUSTOM_ARGS unless `flags` say otherwise; its stderr."""
    status, stderr = run_main("train_with_custom_dataset.py", "--dataset", dataset, "--base_model", micro_base,
                              "--output_dir", out, *CUSTOM_ARGS, *flags)
    assert status == 0, stderr
    return stderr


def padded(ids, end, n=WINDOW):
    return ids[:n] + [end] * (n - len(ids))


@pytest.mark.slow  # trains through the script
@pytest.mark.parametrize("name", FORMATS)
def test_each_format_trains_on_one_window_per_example(micro_base, tokenizer, files, seen, tmp_path, name):
    stderr = train(micro_base, files / name, tmp_path / "model", *([] if name == "d.txt" else ["--text_field", "body"]))
    end = dlm.end_of_text_id(tokenizer)
    expected = [padded(ids, end) for ids in tokenizer(TEXTS, add_special_tokens=False)["input_ids"]]
    assert sorted(ids for ids, _ in seen) == sorted(expected)
    assert all(n_prompt == 0 for _, n_prompt in seen)
    assert "5 examples in a 16-token window" in stderr
    assert dlm.load(tmp_path / "model")[0].config.max_len == WINDOW


@pytest.mark.slow  # trains through the script
def test_a_saved_dataset_reads_the_split_asked_for(micro_base, files, seen, tmp_path):
    train(micro_base, files / "saved", tmp_path / "model", "--text_field", "body", "--split", "test")
    assert len(seen) == 1


@pytest.mark.slow  # trains through the script
def test_packing_trains_long_documents_whole(micro_base, tokenizer, tmp_path, seen):
    long = " ".join(TEXTS * 3)  # about 60 tokens: cut at 16 without --pack
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": long}) + "\n" + json.dumps({"text": TEXTS[0]}) + "\n")
    end = dlm.end_of_text_id(tokenizer)
    stream = [i for text in (long, TEXTS[0]) for i in tokenizer(text, add_special_tokens=False)["input_ids"] + [end]]
    windows = [padded(stream[k: k + WINDOW], end) for k in range(0, len(stream), WINDOW)]
    stderr = train(micro_base, data, tmp_path / "packed", "--pack")
    assert sorted(ids for ids, _ in seen) == sorted(windows)
    assert f"{len(windows)} windows of packed examples in a 16-token window" in stderr and "cut" not in stderr
    seen.clear()
    stderr = train(micro_base, data, tmp_path / "unpacked")
    assert len(seen) == 2 and "1 of 2 examples were longer than --max_len 16 tokens and were cut" in stderr


@pytest.mark.slow  # trains through the script
def test_pairs_train_the_completion_after_a_clean_prompt(micro_base, tokenizer, files, seen, tmp_path):
    stderr = train(micro_base, files / "pairs.jsonl", tmp_path / "model")
    end = dlm.end_of_text_id(tokenizer)
    expected = []
    for i, text in enumerate(TEXTS):
        prompt = tokenizer(f"Say {i}:", add_special_tokens=False)["input_ids"]
        expected.append((padded(prompt + tokenizer(" " + text, add_special_tokens=False)["input_ids"], end),
                         len(prompt)))
    assert sorted(seen) == sorted(expected)
    assert "1 rows with an empty completion were skipped" in stderr


@pytest.mark.slow  # trains through the script
def test_chat_rows_train_the_reply_in_the_chat_template(micro_base, tokenizer, files, seen, tmp_path):
    train(micro_base, files / "chat.jsonl", tmp_path / "model", "--max_len", 48)
    end = dlm.end_of_text_id(tokenizer)
    expected = []
    for i, text in enumerate(TEXTS):
        prompt = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n" \
                 f"<|im_start|>user\nSay {i}<|im_end|>\n<|im_start|>assistant\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply = tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        expected.append((padded(prompt_ids + reply, end, 48), len(prompt_ids)))
    assert sorted(seen) == sorted(expected)
    assert expected[0][0].count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # one id each, not text


@pytest.mark.slow  # trains through the script
def test_chat_prompts_sample_in_the_template_they_trained_in(micro_base, tokenizer, files, tmp_path, monkeypatch):
    out = tmp_path / "model"
    train(micro_base, files / "chat.jsonl", out, "--max_len", 48)
    given, generate = [], dlm.generate
    monkeypatch.setattr(dlm, "generate", lambda model, tok, prompts, **kw: given.extend(prompts) or
                        generate(model, tok, prompts, **kw))
    samples = tmp_path / "samples.jsonl"
    status, stderr = run_main("generate_with_prompt.py", "--model_dir", out, "--prompt", "Say 1", "--chat",
                              "--num_steps", 3, "--output", samples)
    assert status == 0, stderr
    assert given == [dlm.chat_prompt(tokenizer, [{"role": "user", "content": "Say 1"}])]
    record = json.loads(samples.read_text())
    assert record["prompt"] == "Say 1" and "<|im_end|>" not in record["completion"]
    assert record["text"] == record["completion"]  # the reply alone is printed


def test_the_loss_covers_the_completion_and_never_the_prompt(micro_model, spy_forward, monkeypatch):
    model, tokenizer, data = micro_model
    model.config.self_cond_prob = model.config.uncond_prob = 0.0
    ids = next(data.batches(8, 0, 0)).ids
    n_prompt = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    captured, forward = [], model.forward

    def every_position(*args, at=None, labels=None, **kwargs):  # all the logits, so that their gradient shows what the loss reads
        logits = forward(*args, **kwargs)
        logits.retain_grad()
        captured.append(logits)
        return F.cross_entropy(logits[at], labels)

    monkeypatch.setattr(model, "forward", every_position)
    calls = spy_forward(model)
    dlm.diffusion_loss(model, ids, torch.Generator().manual_seed(0), n_prompt=n_prompt).backward()
    (_, t), = calls
    is_prompt = torch.arange(ids.shape[1]) < n_prompt.unsqueeze(1)
    assert (t[is_prompt] == 0).all() and (t[~is_prompt] > 0).all()  # the prompt is clean, the rest noisy
    scored = captured[0].grad.abs().sum(-1) > 0
    assert torch.equal(scored[1:], ~is_prompt[1:])  # the loss reads every position but the prompt's
    # (row 0 has no prompt of its own, so it may get a random clean prefix, as plain text does)


def test_a_prompt_is_sometimes_hidden_for_guidance(micro_model, spy_forward):
    model, tokenizer, data = micro_model
    model.config.self_cond_prob, model.config.uncond_prob = 0.0, 0.5
    ids = next(data.batches(8, 0, 0)).ids
    calls = spy_forward(model)
    dlm.diffusion_loss(model, ids, torch.Generator().manual_seed(0), n_prompt=torch.full((8,), 3))
    (x_t, t), = calls
    hidden = (t[:, :3] == 1).all(1)
    assert 0 < hidden.sum() < 8 and (x_t[hidden, :3] == 0).all()  # withheld: pure noise's mean, at level 1


TRICKY = ["The cat runs.", "caf\u00e9 na\u00efve", "cafe\u0301, written NFD", "line one\nline two", "12345 + 678 = 13023",
          "emoji \U0001f642 and \u4e2d\u6587", "  spaces  inside  ", "<|im_start|>user\nhi<|im_end|>", "'s 've 're 'll",
          "\t tab and trailing newline\n"]


@pytest.mark.parametrize("texts", [TRICKY, TRICKY + ["a text that holds <|endoftext|> itself"]])
def test_the_fast_encoder_gives_the_tokenizers_own_ids(tokenizer, texts):
    assert dlm.tokenizer_hash(tokenizer) == dlm.QWEN_VOCAB_HASH  # so the tiktoken path is the one tested
    encoded = dlm.batch_encoder(tokenizer)(texts)
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert encoded.split() == expected
    assert encoded.lengths.tolist() == [len(ids) for ids in expected]


def test_held_out_examples_are_evenly_spread_and_never_trained_on(tokenizer):
    texts = [f"example {i}" for i in range(20)]
    end = dlm.end_of_text_id(tokenizer)
    cfg = dlm.DataConfig(eval_fraction=0.25)
    train_part = dlm.TextData(texts, tokenizer, 8, end, cfg)
    held_out = dlm.TextData(texts, tokenizer, 8, end, cfg, part="eval")
    decode = lambda data: [tokenizer.decode([i for i in ids if i != end]) for _, ids in data.windows()]
    assert decode(held_out) == ["example 3", "example 7", "example 11", "example 15", "example 19"]
    assert sorted(decode(train_part) + decode(held_out)) == sorted(texts)
    assert train_part.scan()[0] == dlm.TextData(texts, tokenizer, 8, end).scan()[0]  # the vocabulary sees all
    assert train_part.num_examples == 15


def test_evaluate_is_the_same_every_time(micro_model):
    model, tokenizer, data = micro_model
    batches = data.first_batches(8, 16)
    first, again = dlm.evaluate(model, batches), dlm.evaluate(model, batches)
    assert first == again and first["eval_loss"] > 0
    assert list(first["eval_recovered"]) == ["4", "2", "0", "-2"]
    assert all(0 <= share <= 1 for share in first["eval_recovered"].values())


@pytest.mark.slow  # about 50 s: 1,000 steps of the tiny base
def test_pairs_learn_to_answer_held_out_questions(tmp_path):
    from benchmarks.qa import ANIMALS, RECIPE, accuracy, qa_rows

    train_rows, held_out = qa_rows()
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in train_rows))
    status, stderr = run_main("train_with_custom_dataset.py", "--dataset", data, *RECIPE, "--num_epochs", 100,
                              "--output_dir", tmp_path / "model")
    assert status == 0, stderr
    model, tokenizer = dlm.load(tmp_path / "model")
    assert accuracy(model, tokenizer, held_out) >= 0.6 > 1 / len(ANIMALS)  # measured: 0.975-1 (NOTES row 90)


@pytest.mark.slow  # trains through the script
def test_held_out_loss_falls_during_a_short_run(micro_base, data_file, tmp_path):
    out = tmp_path / "model"
    stderr = train(micro_base, data_file, out, "--batch_size", 4, "--num_epochs", 4, "--learning_rate", 3e-3,
                   "--eval_fraction", 0.2, "--eval_every", 4)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12, 16, 20, 24, 28, 32]  # 32 examples in batches of 4, 4 epochs
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    assert "eval=" in stderr  # the progress bar shows it


@pytest.mark.slow  # trains through the script
def test_an_eval_file_is_read_like_the_dataset(micro_base, files, tmp_path):
    out = tmp_path / "model"
    train(micro_base, files / "d.jsonl", out, "--text_field", "body", "--eval_file", files / "d.parquet",
          "--batch_size", 4)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert "eval_loss" in log[-1] and log[-1]["step"] == 2


def write_bad(tmp_path, kind):
    if kind == "no parquet column":
        dlm.quiet_datasets().Dataset.from_list([{"body": "a"}]).to_parquet(str(tmp_path / "d.parquet"))
        return tmp_path / "d.parquet"
    path = tmp_path / {"not json": "d.jsonl", "no field": "d.jsonl", "no column": "d.csv", "role": "chat.jsonl",
                       "last": "chat.jsonl"}.get(kind, "d.txt")
    text = {"not json": '{"text": "a"}\n{"text": "b"\n',
            "no field": '{"text": "a"}\n{"body": "b"}\n',
            "no column": "body,n\nhello,1\n",
            "role": json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}),
            "last": json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]})}
    path.write_text(text.get(kind, "The cat runs.\n"))
    return path


@pytest.mark.slow  # runs the script
@pytest.mark.parametrize("kind,flags,phrase", [
    ("not json", [], "d.jsonl: row 2 is not JSON"),
    ("no field", [], "d.jsonl: row 2: no 'text' field (it has: body)"),
    ("no column", [], "d.csv: row 1: no 'text' field (it has: body, n)"),
    ("no parquet column", [], "d.parquet: row 1: no 'text' field (it has: body)"),
    ("role", [], "chat.jsonl: row 1: unknown chat role 'robot'"),
    ("last", [], "chat.jsonl: row 1: a chat row needs a message, then the assistant's reply"),
    ("hub", [], "no Hub dataset of that name is cached here"),
    ("pack", ["--pack", "--max_len", "1"], "--pack needs --max_len 2 or more"),
    ("both", ["--eval_file", "{data}", "--eval_fraction", "0.1"], "give --eval_file or --eval_fraction, not both"),
    ("fraction", ["--eval_fraction", "1"], "would hold out everything"),
    ("none held out", ["--eval_fraction", "0.1"], "holds out none of the 1 examples"),
])
def test_bad_data_is_one_line_and_writes_nothing(micro_base, tmp_path, kind, flags, phrase):
    data = "nobody/no-such-dataset" if kind == "hub" else write_bad(tmp_path, kind)
    out = tmp_path / "model"
    status, stderr = run_main("train_with_custom_dataset.py", "--dataset", data, "--base_model", micro_base,
                              "--output_dir", out, *[str(f).format(data=data) for f in flags])
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and phrase in lines[0], stderr
    assert "Traceback" not in stderr and not out.exists()
    if kind == "hub":
        assert "give its file or folder" in lines[0]


@pytest.mark.slow  # trains through the script
def test_tensorboard_curves_are_saved_with_the_model(micro_base, data_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "model"
    train(micro_base, data_file, out, "--batch_size", 4, "--eval_fraction", 0.2, "--eval_every", 4,
          "--report_to", "tensorboard")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "runs")).Reload()
    losses = [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")]
    assert losses == [(line["step"], line["loss"]) for line in log if "loss" in line]
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [4, 8]
    assert events.Scalars("train/tokens_per_second")[0].value > 0
    dlm.load(out)  # runs/ is part of the model folder


def test_report_to_a_logger_that_is_not_installed_is_one_line(micro_base, data_file, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    status, stderr = run_main("train_with_custom_dataset.py", "--dataset", data_file, "--base_model", micro_base,
                              "--output_dir", tmp_path / "model", "--report_to", "wandb")
    assert status == 2 and stderr.strip() == "error: --report_to wandb needs the wandb package: pip install wandb"
    assert not (tmp_path / "model").exists()
