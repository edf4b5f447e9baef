"""Scaling features: torchrun (DDP on CPU/gloo), LoRA, gradient checkpointing, gradient accumulation."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from safetensors.torch import load_file, save_file

import dlm_common as dlm
from helpers import REPO, run_main


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale-data") / "data.txt"
    path.write_text("\n".join(dlm.builtin_corpus(41, seed=5)) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_torchrun_two_processes(micro_base, data_file, tmp_path):
    out, trace = tmp_path / "model", tmp_path / "trace"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "tests" / "traced.py"), str(trace), "train_with_custom_dataset.py", "--dataset", str(data_file),
           "--base_model", str(micro_base), "--output_dir", str(out), "--max_len", "16", "--batch_size", "4",
           "--num_epochs", "2", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2" in r.stderr  # the summary line counts both processes
    # one checkpoint, written once (by rank 0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("model", ".model"))) == ["model"]
    # each epoch, the two ranks saw disjoint halves: 41 lines -> 20 each, one left over
    seen = [[int(n) for n in (tmp_path / f"trace.rank{r}").read_text().split()] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 2 * 20
    for epoch in range(2):
        a, b = (set(s[epoch * 20:(epoch + 1) * 20]) for s in seen)
        assert len(a) == len(b) == 20 and not a & b
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["pos"]["step"] == 2 * 5  # 20 examples per rank in batches of 4, twice
    model, tokenizer = dlm.load(out)
    assert len(dlm.generate(model, tokenizer, [""], num_samples=2, seq_len=16, cfg=dlm.SampleConfig(num_steps=3))) == 2


def lora_model(micro_base, corpus, r=4):
    base, tok = dlm.load_base_model(str(micro_base)), dlm.load_tokenizer(str(micro_base))
    data = dlm.TextData(corpus, tok, 16, dlm.end_of_text_id(tok))
    token_ids, _ = data.scan()
    torch.manual_seed(0)
    config = dlm.DLMConfig(base_model=str(micro_base), max_len=16, lora_r=r)
    return dlm.build_model(config, base, tok, token_ids), tok, data


def test_lora_trains_only_adapters_and_diffusion_layers(micro_base, corpus, tmp_path):
    model, tok, data = lora_model(micro_base, corpus)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.split(".")[0] in ("time_mlp", "self_cond", "head") for n in trainable)
    assert any("lora_" in n for n in trainable) and any(n.startswith("head") for n in trainable)
    body = model.body.get_base_model()
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # rank 4 on 7 projections in each of 2 layers: (in + out) * r per projection
    per_layer = sum(4 * (lin.in_features + lin.out_features) for name, lin in body.layers[0].named_modules()
                    if name.split(".")[-1] in dlm.LORA_TARGETS and hasattr(lin, "in_features"))
    assert n_lora == 2 * per_layer
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=3e-3, num_epochs=2),
              save=lambda trainer: dlm.save(model, tok, tmp_path / "m", trainer))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"{n} moved"
    # the adapters matter: switching them off changes the output
    x_t, t = torch.randn(2, 16, model.dim), torch.full((2, 16), 0.5)
    model.eval()
    with torch.no_grad():
        with_adapters = model(x_t, t, torch.zeros_like(x_t))
        with model.body.disable_adapter():
            without = model(x_t, t, torch.zeros_like(x_t))
    assert not torch.allclose(with_adapters, without)
    # the folder holds peft's adapter files and the layers that train fully, not Qwen's weights, which
    # load takes from the base, checked by its hash
    folder = tmp_path / "m"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in folder.iterdir()}
    assert not any(name.startswith("body.") for name in load_file(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    assert config["lora_r"] == 4 and config["base_hash"] == dlm.weights_hash(dlm.load_base_model(str(micro_base)).model)
    loaded, tok2 = dlm.load(folder)
    cfg = dlm.SampleConfig(num_steps=5)
    assert [s["token_ids"] for s in dlm.generate(loaded, tok2, [""], num_samples=3, seq_len=16, cfg=cfg, seed=1)] == \
           [s["token_ids"] for s in dlm.generate(model, tok, [""], num_samples=3, seq_len=16, cfg=cfg, seed=1)]


def test_merge_lora_gives_a_whole_model_that_predicts_the_same(micro_base, corpus, tmp_path):
    model, tok, data = lora_model(micro_base, corpus)
    dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=3e-3, num_epochs=1))
    x_t, t = torch.randn(2, 16, model.dim), torch.full((2, 16), 0.5)
    model.eval()
    with torch.no_grad():
        before = model(x_t, t, torch.zeros_like(x_t))
        merged = dlm.merge_lora(model)
        assert merged.config.lora_r == 0 and not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged.eval()(x_t, t, torch.zeros_like(x_t)), before, atol=1e-5)
    dlm.save(merged, tok, tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_model.safetensors").exists()
    loaded, _ = dlm.load(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(loaded(x_t, t, torch.zeros_like(x_t)), before, atol=1e-5)


@pytest.mark.parametrize("base", ["missing", "other weights"])
@pytest.mark.slow
def test_a_lora_folder_without_its_base_names_the_base_expected(micro_base, corpus, tmp_path, base):
    model, tok, _ = lora_model(micro_base, corpus)
    folder = tmp_path / "m"
    dlm.save(model, tok, folder)
    config = json.loads((folder / "config.json").read_text())
    moved = tmp_path / "base"
    if base == "other weights":
        shutil.copytree(micro_base, moved)
        weights = load_file(moved / "model.safetensors")
        weights["model.norm.weight"] += 1
        save_file(weights, moved / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config, "base_model": str(moved)}))
    status, err = run_main("dlm_test.py", "--model_dir", folder, "--seq_len", 8, "--num_steps", 2)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{moved} (weights hash {config['base_hash']})" in err


@pytest.mark.slow
def test_lora_folders_saved_whole_still_load(micro_base, corpus, tmp_path):
    """Until 2026-11-29 a LoRA folder held every weight, Qwen's included, and no adapter files."""
    model, tok, _ = lora_model(micro_base, corpus)
    dlm.save(model, tok, tmp_path / "m")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (tmp_path / "m" / name).unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m" / "model.safetensors")
    loaded, _ = dlm.load(tmp_path / "m")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


@pytest.mark.slow
def test_merge_lora_flag_writes_a_whole_model_that_automodel_loads(micro_base, tmp_path):
    from transformers import AutoModel

    data = tmp_path / "data.txt"
    data.write_text("\n".join(dlm.builtin_corpus(40, seed=3)) + "\n")
    flags = ("--dataset", data, "--base_model", micro_base, "--max_len", 16, "--batch_size", 8, "--num_epochs", 1)
    status, err = run_main("train_with_custom_dataset.py", *flags, "--output_dir", tmp_path / "plain",
                           "--merge_lora", tmp_path / "merged")
    assert status == 2 and "add --lora" in err and not (tmp_path / "plain").exists()
    status, err = run_main("train_with_custom_dataset.py", *flags, "--lora", "--lora_r", 4, "--output_dir",
                           tmp_path / "lora", "--merge_lora", tmp_path / "merged")
    assert status == 0, err
    merged, _ = dlm.load(tmp_path / "merged")
    assert merged.config.lora_r == 0 and not (tmp_path / "merged" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "merged" / "trainer_state.json").exists()
    hf = AutoModel.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    assert all(torch.equal(v, hf.denoiser.state_dict()[k]) for k, v in merged.state_dict().items())
    with pytest.raises(ValueError, match="LoRA"):
        AutoModel.from_pretrained(tmp_path / "lora", trust_remote_code=True)


@pytest.mark.slow
def test_lora_folder_of_a_qwen25_05b_shaped_base_is_under_a_tenth_of_the_whole(tokenizer, corpus, tmp_path):
    """Qwen2.5-0.5B's shape (random weights): the adapters (rank 16, every projection) plus the diffusion
    layers, against the same model merged and saved whole."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                        tie_word_embeddings=True))
    data = dlm.TextData(corpus, tokenizer, 16, dlm.end_of_text_id(tokenizer))
    token_ids, _ = data.scan()
    model = dlm.build_model(dlm.DLMConfig(max_len=16, lora_r=dlm.LORA_RANK), base, tokenizer, token_ids)
    size = lambda folder: sum(p.stat().st_size for p in folder.iterdir())
    dlm.save(model, tokenizer, tmp_path / "lora")
    dlm.save(dlm.merge_lora(model), tokenizer, tmp_path / "whole")
    ratio = size(tmp_path / "lora") / size(tmp_path / "whole")
    print(f"LoRA folder {size(tmp_path / 'lora') / 1e6:.1f} MB, whole {size(tmp_path / 'whole') / 1e6:.1f} MB: "
          f"{ratio:.1%}")
    assert ratio < 0.10


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(micro_model):
    model, _, data = micro_model
    ids = next(data.batches(16, epoch=0, seed=0))[1]
    model.train()

    mlp, mlp_calls = model.body.layers[0].mlp, []
    mlp.forward = lambda *a, forward=mlp.forward: mlp_calls.append(1) or forward(*a)  # hooks skip the recompute

    def loss_and_grads():
        model.zero_grad()
        mlp_calls.clear()
        loss = dlm.diffusion_loss(model, ids, torch.Generator().manual_seed(0))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads()
    plain_calls = len(mlp_calls)
    model.body.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.body.is_activation_checkpointing
    ckpt_loss, ckpt = loss_and_grads()
    assert len(mlp_calls) == plain_calls + 1  # the layer really was recomputed in the backward pass
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-5), n


def test_gradient_accumulation_counts_optimiser_steps(micro_model):
    """64 examples in micro-batches of 8, two per step: 4 optimiser steps an epoch, not 8."""
    model, _, data = micro_model
    log = dlm.train(model, data, dlm.TrainConfig(batch_size=8, grad_accum=2, learning_rate=1e-3, num_epochs=1))
    assert log[-1]["step"] == 4 and log[-1]["loss"] > 0
