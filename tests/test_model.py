"""The denoiser, the schedule, nearest-neighbour decoding, save/load and base loading."""

import json

import pytest
import torch

import dlm_common as dlm


def test_attention_is_bidirectional(micro_model):
    model, _, _ = micro_model
    model.eval()
    B, L = 1, 6
    x_t = torch.randn(B, L, model.dim)
    t = torch.full((B, L), 0.5)
    changed = x_t.clone()
    changed[0, -1] += 1.0  # perturb only the last position
    with torch.no_grad():
        first = model(x_t, t, torch.zeros_like(x_t))[0, 0]
        first_changed = model(changed, t, torch.zeros_like(x_t))[0, 0]
    assert not torch.allclose(first, first_changed), "the first position did not see the last one"


def test_causal_qwen_would_fail_the_same_check(micro_base):
    """Control: the same check on the untouched (causal) Qwen body sees no change, so the test above
    is not vacuous."""
    base = dlm.load_base_model(str(micro_base))
    x = torch.randn(1, 6, base.config.hidden_size)
    y = x.clone()
    y[0, -1] += 1.0
    with torch.no_grad():
        a, b = (base.model(inputs_embeds=v).last_hidden_state[0, 0] for v in (x, y))
    assert torch.allclose(a, b)


def test_noise_schedule():
    s = dlm.NoiseSchedule(num_steps=1000, logsnr_min=-6.0, logsnr_max=6.0)
    t = torch.linspace(0, 1, 11)
    alpha_bar = s.alpha_bar(t)
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1]), "signal must fall as t grows"
    assert alpha_bar[0] == pytest.approx(torch.sigmoid(torch.tensor(6.0)).item())
    assert alpha_bar[-1] == pytest.approx(torch.sigmoid(torch.tensor(-6.0)).item())
    assert s.alpha_bar(torch.tensor(0.5)) == pytest.approx(0.5)  # log-SNR 0 at the midpoint
    steps = s.timesteps(7)
    assert steps[0] == 1.0 and steps[-1] == 0.0 and len(steps) == 8
    assert torch.all(steps[1:] < steps[:-1]) and torch.equal(torch.round(steps * 1000), steps * 1000)
    t = s.sample_t((10000,), torch.Generator().manual_seed(0))
    assert t.min() >= 1 / 1000 and t.max() <= 1.0 and abs(t.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_keeps_the_forward_marginal(eta):
    """Given the true x0, a step from x_t ~ q(x_t | x0) lands on q(x_s | x0): mean sqrt(alpha_s) x0,
    variance 1 - alpha_s, whatever eta; eta = 0 adds no noise of its own, eta > 0 does."""
    g = torch.Generator().manual_seed(0)
    alpha_t, alpha_s = torch.tensor(0.2), torch.tensor(0.7)
    x0 = torch.full((200000, 1), 0.6)
    x_t = alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * torch.randn(x0.shape, generator=g)
    x_s = dlm.ddim_step(x_t, x0, alpha_t, alpha_s, eta, g)
    assert x_s.mean().item() == pytest.approx(alpha_s.sqrt().item() * 0.6, abs=0.01)
    assert x_s.var().item() == pytest.approx(1 - alpha_s.item(), abs=0.01)
    again = dlm.ddim_step(x_t, x0, alpha_t, alpha_s, eta, torch.Generator().manual_seed(1))
    assert torch.equal(x_s, again) == (eta == 0)


def all_ids(data):
    return torch.cat([batch for _, batch in data.batches(64, epoch=0, seed=0)])


def test_nearest_neighbour_returns_the_exact_tokens(micro_model):
    model, _, data = micro_model
    ids = all_ids(data)
    E = model.vocab_embeddings()
    decoded = model.vocab_ids[dlm.nearest_neighbour(model.embed(ids), E, chunk=7)]
    assert torch.equal(decoded, ids)


def test_vocabulary_is_the_data_plus_end_of_text(micro_model):
    model, tok, data = micro_model
    ids = all_ids(data)
    expected = set(ids.flatten().tolist()) | {dlm.end_of_text_id(tok)}
    assert set(model.vocab_ids.tolist()) == expected
    assert model.config.vocab_size == len(expected)
    assert torch.equal(model.vocab_ids[model.vocab_index(ids)], ids)


def test_full_vocabulary(micro_base, corpus):
    base, tok = dlm.load_base_model(str(micro_base)), dlm.load_tokenizer(str(micro_base))
    model = dlm.build_model(dlm.DLMConfig(vocab="full"), base, tok)
    assert torch.equal(model.vocab_ids, torch.arange(base.config.vocab_size))
    assert model.config.vocab_size == base.config.vocab_size


def test_loss_trains_and_is_finite(micro_model):
    model, _, data = micro_model
    ids = all_ids(data)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(30):
        loss = dlm.diffusion_loss(model, ids[:32], g)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and loss.item() < first


def test_qwen_embeddings_stay_frozen(micro_model):
    model, _, _ = micro_model
    assert not model.body.get_input_embeddings().weight.requires_grad
    assert model.head.weight.requires_grad and model.body.layers[0].mlp.up_proj.weight.requires_grad


def test_save_load_and_sample_reproduce(micro_model, tmp_path):
    model, tok, data = micro_model
    log = dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=1e-3, num_epochs=1),
                    save=lambda trainer: dlm.save(model, tok, tmp_path / "m", trainer))
    assert log[-1]["step"] == 4
    cfg = dlm.SampleConfig(num_steps=8)
    before = dlm.generate(model, tok, [""], 4, 16, cfg, seed=3)
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer", "train_log.jsonl", "trainer_state.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["base_model"] == model.config.base_model and saved["base_config"]["model_type"] == "qwen2"
    loaded, tok2 = dlm.load(tmp_path / "m")
    after = dlm.generate(loaded, tok2, [""], 4, 16, cfg, seed=3)
    assert [s["token_ids"] for s in after] == [s["token_ids"] for s in before]
    assert [s["text"] for s in after] == [s["text"] for s in before]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_the_seed_sets_the_noise(micro_model):
    """Same seed, same trajectory; another seed, another one (seen through the per-step callback,
    since an untrained model rounds every trajectory to the same tokens)."""
    model, tok, _ = micro_model

    def trajectory(seed):
        recorder = dlm.StepRecorder()
        dlm.generate(model, tok, [""], 2, 16, dlm.SampleConfig(num_steps=4), seed=seed, callback=recorder)
        return torch.stack([confidence for _, confidence, _, _ in recorder.frames])

    assert torch.equal(trajectory(1), trajectory(1))
    assert not torch.equal(trajectory(1), trajectory(2))


def test_shorter_text_is_the_window_with_an_end_of_text_tail(micro_model):
    """The model denoises its whole max_len window; seq_len only fixes the positions from there on
    to end-of-text (clean context), so text ends within seq_len and every step shows seq_len tokens."""
    model, tok, _ = micro_model
    seen = []

    def spy(x_t, t, x0_cond):
        seen.append((x_t.shape[1], t[:, 6:].clone()))
        return forward(x_t, t, x0_cond)

    forward, recorder = model.forward, dlm.StepRecorder()
    model.forward = spy
    try:
        out = dlm.generate(model, tok, ["", "The cats"], 3, 6, dlm.SampleConfig(num_steps=4, guidance_scale=1.0),
                           callback=recorder)
    finally:
        del model.forward
    assert all(width == model.config.max_len and torch.all(t == 0) for width, t in seen)
    assert all(len(o["token_ids"]) <= 6 for o in out)
    assert all(ids.shape[-1] == 6 for ids, _, _, _ in recorder.frames)


def test_local_base_loads_through_from_pretrained(micro_base):
    base, tok = dlm.load_base_model(str(micro_base)), dlm.load_tokenizer(str(micro_base))
    assert base.config.model_type == "qwen2" and base.config.hidden_size == 32
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]  # Qwen2.5's own ids


def test_unknown_hub_model_offline_is_one_clear_error():
    with pytest.raises(dlm.DLMError, match="--base_model tiny"):
        dlm.load_tokenizer("Qwen/no-such-model-here")


def test_non_qwen_base_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(dlm.DLMError, match="Qwen"):
        dlm.load_base_model(str(tmp_path))
