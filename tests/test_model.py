"""The denoiser, the schedule, nearest-neighbour decoding, save/load and base loading."""

import json

import pytest
import torch
import torch.nn.functional as F

import dlm_common as dlm
import modeling_dlm
from helpers import micro_denoiser


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


def test_positions_to_decide():
    """Every open position at least `threshold` likely, and at least the most confident
    1/steps_left of the open ones; never a closed one; the last step takes all that are left."""
    log_conf = torch.tensor([[0.95, 0.2, 0.6, 0.5, 0.99, 0.1]]).log()
    open_ = torch.tensor([[True, True, True, True, False, True]])
    decide = lambda steps_left, threshold=0.9: dlm.positions_to_decide(log_conf, open_, steps_left, threshold)[0].tolist()
    assert decide(5) == [True, False, False, False, False, False]  # over the threshold, and ceil(5/5) = 1
    assert decide(2) == [True, False, True, True, False, False]  # ceil(5/2) = 3, most confident first
    assert decide(5, threshold=0.55) == [True, False, True, False, False, False]
    assert decide(1) == open_[0].tolist()
    # forcing only every third step (counted back from the last): between them, the threshold alone
    every3 = lambda steps_left: dlm.positions_to_decide(log_conf, open_, steps_left, 0.9, every=3)[0].tolist()
    assert every3(6) == every3(5) == [True, False, False, False, False, False]
    assert every3(4) == [True, False, True, True, False, False]  # 2 forcing steps left: ceil(5/2) = 3
    assert every3(1) == open_[0].tolist()


def test_an_order_other_than_confidence_picks_the_forced_share():
    """`order` ranks the forced share (the threshold still reads the confidence); default: confidence."""
    log_conf = torch.tensor([[0.95, 0.2, 0.6, 0.5, 0.99, 0.1]]).log()
    open_ = torch.tensor([[True, True, True, True, False, True]])
    reverse = -log_conf
    decide = lambda order: dlm.positions_to_decide(log_conf, open_, 2, 0.9, order=order)[0].tolist()
    assert decide(None) == [True, False, True, True, False, False]
    assert decide(reverse) == [True, True, False, True, False, True]  # least confident first, plus the sure one


def test_drawn_tokens_follow_the_prediction_among_the_allowed():
    log_probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).clamp(min=1e-9).log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(dlm.draw_tokens(log_probs, None, 1.0, g), minlength=4) / 20000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015)
    allowed = torch.tensor([False, True, True, True]).expand(20000, 4)
    counts = torch.bincount(dlm.draw_tokens(log_probs, allowed, 1.0, g), minlength=4) / 20000
    assert counts[0] == 0 and counts[1] == pytest.approx(0.6, abs=0.015)
    assert torch.all(dlm.draw_tokens(log_probs, None, 1e-6, g) == 0)  # a tiny temperature: the argmax


def test_drawn_decisions_at_a_tiny_temperature_are_the_rounded_ones(micro_model):
    """Drawing the decided token only changes which token a decided position gets: at a temperature
    near 0 both pick the top token, so the samples are the same; at temperature 1 they differ."""
    model, tok, _ = micro_model
    L = model.config.max_len
    args = torch.full((8, L), model.config.end_id), torch.zeros(8, L, dtype=torch.bool)
    run = lambda **kw: dlm.sample(model, *args, dlm.SampleConfig(num_steps=5, **kw), torch.Generator().manual_seed(0),
                                  progress=False)
    assert torch.equal(run(temperature=1e-4), run(temperature=1e-4, draw=True))
    assert not torch.equal(run(), run(draw=True))


def test_order_noise_changes_which_positions_are_decided_first(micro_model, spy_forward):
    model, tok, _ = micro_model
    L, seen = model.config.max_len, spy_forward(model)
    args = torch.full((8, L), model.config.end_id), torch.zeros(8, L, dtype=torch.bool)
    for noise in (0.0, 100.0):
        dlm.sample(model, *args, dlm.SampleConfig(num_steps=5, order_noise=noise), torch.Generator().manual_seed(0),
                   progress=False)
    (_, quiet), (_, noisy) = seen[1], seen[6]  # the second step of each run
    assert not torch.equal(quiet == 0, noisy == 0)  # the positions decided by the first step differ


@pytest.mark.parametrize("block_size, order", [(0, "left_to_right"), (4, "auto")])
def test_left_to_right_decides_the_leftmost_open_position_first(micro_base, corpus, spy_forward, block_size, order):
    """With one decision a step and no token sure enough to jump the queue, step k decides position k:
    asked for, or by default in a block model."""
    model, tok, _ = micro_denoiser(micro_base, corpus, block_size=block_size)
    L, seen = model.config.max_len, spy_forward(model)
    cfg = dlm.SampleConfig(num_steps=block_size or L, order=order, decide=1.1)
    dlm.sample(model, torch.full((2, L), model.config.end_id), torch.zeros(2, L, dtype=torch.bool), cfg,
               torch.Generator().manual_seed(0), progress=False)
    width = block_size or L  # the positions a step sees: its block's
    assert len(seen) == L
    for k, (_, t) in enumerate(seen):
        if block_size and k % width == 0:  # a block's first pass: its first position alone, still open
            assert t.shape == (2, 1) and (t > 0).all(), k
        else:
            assert torch.equal(t == 0, (torch.arange(width) < k % width).expand(2, width)), k


def test_the_automatic_settings_follow_the_model(micro_base, corpus):
    """A block model decides left to right and draws its tokens (its rounded samples barely vary); any
    other decides the most confident first and rounds; settings given explicitly stay."""
    concrete = lambda cfg, block_size: dlm.modeling_dlm.for_model(cfg, micro_denoiser(micro_base, corpus,
                                                                                      block_size=block_size)[0])
    auto = dlm.SampleConfig()
    assert (concrete(auto, 4).order, concrete(auto, 4).draw) == ("left_to_right", True)
    assert (concrete(auto, 0).order, concrete(auto, 0).draw) == ("confidence", False)
    given = dlm.SampleConfig(order="confidence", draw=False)
    assert (concrete(given, 4).order, concrete(given, 4).draw) == ("confidence", False)


def test_an_unknown_order_is_refused(micro_model):
    model, tok, _ = micro_model
    with pytest.raises(ValueError, match="left_to_right"):
        dlm.generate(model, tok, [""], cfg=dlm.SampleConfig(order="right_to_left"))


def test_sampling_decides_positions_for_good(micro_model, spy_forward):
    """A decided position enters every later step as a clean token embedding at noise level 0, each
    step decides at least one more position per row, and the output is the decided tokens."""
    model, tok, _ = micro_model
    seen, L = spy_forward(model), model.config.max_len
    ids = dlm.sample(model, torch.full((2, L), model.config.end_id), torch.zeros(2, L, dtype=torch.bool),
                     dlm.SampleConfig(num_steps=5), torch.Generator().manual_seed(0), progress=False)
    assert len(seen) == 5
    for (x_a, t_a), (x_b, t_b) in zip(seen, seen[1:]):
        fixed = t_a == 0
        assert torch.all(t_b[fixed] == 0) and torch.equal(x_b[fixed], x_a[fixed])
        assert torch.all((t_b == 0).sum(1) > fixed.sum(1))
    x_last, t_last = seen[-1]
    fixed = t_last == 0
    assert torch.equal(ids[fixed], model.vocab_ids[dlm.nearest_neighbour(x_last[fixed], model.vocab_embeddings())])
    assert torch.allclose(x_last[fixed].norm(dim=-1), torch.ones(int(fixed.sum())))


def test_forced_decisions_are_spread_when_steps_outnumber_decision_steps(micro_model, spy_forward):
    """With twice decision_steps steps, the forced share is taken on every second step, ending with
    the last, instead of one position per step from the first step on."""
    model, tok, _ = micro_model
    seen, L = spy_forward(model), model.config.max_len
    cfg = dlm.SampleConfig(num_steps=8, decision_steps=4, decide=1.1)  # no token is ever sure enough
    dlm.sample(model, torch.full((2, L), model.config.end_id), torch.zeros(2, L, dtype=torch.bool), cfg,
               torch.Generator().manual_seed(0), progress=False)
    decided = [(t == 0).sum(1) for _, t in seen]  # positions decided before each step
    assert len(seen) == 8 and torch.all(decided[0] == 0)
    for i, (before, after) in enumerate(zip(decided, decided[1:])):
        assert torch.all(after > before) if i % 2 else torch.equal(after, before), i


def test_sampling_stops_once_every_position_is_decided(micro_model, spy_forward):
    """With every position decided after the first step, the other steps would change nothing and
    are not run: the output is a one-step sampler's."""
    model, tok, _ = micro_model
    calls, L = spy_forward(model), model.config.max_len
    args = torch.full((2, L), model.config.end_id), torch.zeros(2, L, dtype=torch.bool)
    early = dlm.sample(model, *args, dlm.SampleConfig(num_steps=5, decide=1e-9), torch.Generator().manual_seed(0),
                       progress=False)
    assert len(calls) == 1
    one_step = dlm.sample(model, *args, dlm.SampleConfig(num_steps=1), torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(early, one_step)


@pytest.mark.parametrize("block_size, guidance_scale", [(0, 1.0), (0, 5.0), (4, 1.0)])
def test_the_head_runs_on_the_open_positions_only(micro_base, corpus, monkeypatch, block_size, guidance_scale):
    """A decided position needs no prediction: each step computes the logits (N, V) of the N open
    positions only, and the samples are those of computing every position's and keeping the open
    ones'."""
    model, tok, _ = micro_denoiser(micro_base, corpus, block_size=block_size)
    cfg = dlm.SampleConfig(num_steps=5, guidance_scale=guidance_scale)
    run = lambda: [s["token_ids"] for s in dlm.generate(model, tok, ["", "The cats near the dog"], num_samples=2,
                                                        seq_len=16, cfg=cfg, seed=3)]
    forward, rows = model.forward, head_rows(model, monkeypatch)
    open_only = run()
    assert all(n == n_open for n, n_open, _ in rows) and any(n_open < n_all for _, n_open, n_all in rows)
    keep_after_every_position(model, forward, monkeypatch)
    assert run() == open_only


@pytest.mark.parametrize("block_size", [0, 4])
def test_the_training_head_runs_on_the_scored_positions_only(micro_base, corpus, monkeypatch, block_size):
    """The loss needs logits only where it is scored: the head gets those positions alone, and the
    loss is that of computing every position's logits and keeping the scored ones'."""
    model, _, data = micro_denoiser(micro_base, corpus, block_size=block_size, self_cond_prob=0.0)
    ids = next(data.batches(8, 0, 0)).ids
    loss = lambda: dlm.diffusion_loss(model, ids, torch.Generator().manual_seed(0))
    forward, rows = model.forward, head_rows(model, monkeypatch)
    scored_only = loss()
    (n, n_scored, n_all), = rows
    assert n == n_scored < n_all
    keep_after_every_position(model, forward, monkeypatch)
    assert torch.allclose(loss(), scored_only)


def head_rows(model, monkeypatch):
    """From now on, each call of model.forward appends (rows the head computed, positions its `at`
    sets, positions): the head's rows are those of its logits, or with `labels` those whose
    cross-entropy it computed."""
    forward, rows, head = model.forward, [], []
    monkeypatch.setattr(model.head, "forward", lambda h: head.append(len(h)) or F.linear(h, model.head.weight))
    fused = modeling_dlm.linear_cross_entropy
    monkeypatch.setattr(modeling_dlm, "linear_cross_entropy", lambda h, *args: head.append(len(h)) or fused(h, *args))

    def recording(*args, at=None, **kwargs):
        out = forward(*args, at=at, **kwargs)
        rows.append((head.pop(), int(at.sum()), at.numel()))
        return out

    monkeypatch.setattr(model, "forward", recording)
    return rows


def keep_after_every_position(model, forward, monkeypatch):
    """model.forward computes every position's logits, then keeps those `at` sets (and with `labels`,
    returns their mean cross-entropy)."""
    def every_position(*args, at=None, labels=None, **kwargs):
        logits = forward(*args, **kwargs)[at]
        return logits if labels is None else F.cross_entropy(logits, labels)

    monkeypatch.setattr(model, "forward", every_position)


def test_linear_cross_entropy_is_that_of_the_whole_logits():
    """The training loss, computed a chunk of rows at a time with its gradient on the way, is
    F.cross_entropy of all the logits at once: its value and its gradients, with a trained and a
    frozen head, and without gradient."""
    g = torch.Generator().manual_seed(0)
    # 8,192 vocabulary rows make chunks of 128 rows: 300 rows are three chunks, the last one short
    h = torch.randn(300, 8, generator=g, requires_grad=True)
    weight = torch.randn(8192, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 8192, (300,), generator=g)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    want, got = F.cross_entropy(h @ weight.T, y), dlm.linear_cross_entropy(h, weight, y)
    assert close(got, want)
    assert all(map(close, torch.autograd.grad(3 * got, [h, weight]), torch.autograd.grad(3 * want, [h, weight])))
    frozen = weight.detach()
    got = torch.autograd.grad(dlm.linear_cross_entropy(h, frozen, y), h)[0]
    assert close(got, torch.autograd.grad(F.cross_entropy(h @ frozen.T, y), h)[0])
    with torch.no_grad():
        assert close(dlm.linear_cross_entropy(h, weight, y), want)


def all_ids(data):
    return torch.cat([batch.ids for batch in data.batches(64, epoch=0, seed=0)])


def test_nearest_neighbour_returns_the_exact_tokens(micro_model):
    model, _, data = micro_model
    ids = all_ids(data)
    E = model.vocab_embeddings()
    decoded = model.vocab_ids[dlm.nearest_neighbour(model.embed(ids), E, chunk=7)]
    assert torch.equal(decoded, ids)
    # with each exact token ruled out, the closest of the allowed rows
    exact = dlm.nearest_neighbour(model.embed(ids), E)
    allowed = torch.ones(*ids.shape, len(E), dtype=torch.bool).scatter(-1, exact.unsqueeze(-1), False)
    expected = (model.embed(ids) @ E.T).masked_fill(~allowed, -float("inf")).argmax(-1)
    assert torch.equal(dlm.nearest_neighbour(model.embed(ids), E, allowed, chunk=7), expected)
    assert not torch.equal(expected, exact)
    nothing = torch.zeros(0, E.shape[1])  # a step that decides no position
    assert dlm.nearest_neighbour(nothing, E).shape == (0,)
    assert dlm.nearest_neighbour(nothing, E, torch.ones(0, len(E), dtype=torch.bool)).shape == (0,)


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


def test_trained_embeddings_start_as_qwen_s_rows_and_only_the_vocabulary_s_train(micro_base, corpus, tmp_path):
    """With train_embeddings the diffusion vocabulary's input rows are a trained copy: a new model embeds
    every id as the frozen one does, Qwen's own table gets no gradient, an id outside the vocabulary
    (a prompt's) keeps Qwen's row, and the rows a step moved are what x0, rounding and a reload use."""
    frozen, _, _ = micro_denoiser(micro_base, corpus)
    model, tok, data = micro_denoiser(micro_base, corpus, train_embeddings=True)
    ids = all_ids(data)[:16]
    outside = torch.tensor([min(set(range(len(model.vocab_ids) + 1)) - set(model.vocab_ids.tolist()))])
    with torch.no_grad():
        assert torch.equal(model.embed(ids), frozen.embed(ids))
        assert torch.equal(model.vocab_embeddings(), frozen.vocab_embeddings())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    dlm.diffusion_loss(model, ids, torch.Generator().manual_seed(0)).backward()
    assert model.body.get_input_embeddings().weight.grad is None and model.rows.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(model.embed(ids), frozen.embed(ids))
        assert torch.equal(model.embed(outside), frozen.embed(outside))
        assert torch.equal(model.vocab_embeddings(), model.embed(model.vocab_ids))
    dlm.save(model, tok, tmp_path / "m")
    loaded, _ = dlm.load(tmp_path / "m")
    assert loaded.config.train_embeddings and torch.equal(loaded.vocab_embeddings(), model.vocab_embeddings())
    values = model.config.to_diff_dict()
    del values["train_embeddings"]
    assert dlm.parse_config(values).train_embeddings is False  # folders saved before the field: Qwen's rows


def test_save_load_and_sample_reproduce(micro_model, tmp_path):
    model, tok, data = micro_model
    log = dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=1e-3, num_epochs=1),
                    save=lambda trainer: dlm.save(model, tok, tmp_path / "m", trainer))
    assert log[-1]["step"] == 4
    cfg = dlm.SampleConfig(num_steps=8)
    before = dlm.generate(model, tok, [""], num_samples=4, seq_len=16, cfg=cfg, seed=3)
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_dlm.py", "tokenizer.json", "tokenizer_config.json",
            "train_log.jsonl", "trainer_state.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["base_model"] == model.config.base_model and saved["base_config"]["model_type"] == "qwen2"
    loaded, tok2 = dlm.load(tmp_path / "m")
    after = dlm.generate(loaded, tok2, [""], num_samples=4, seq_len=16, cfg=cfg, seed=3)
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
        dlm.generate(model, tok, [""], num_samples=2, seq_len=16, cfg=dlm.SampleConfig(num_steps=4), seed=seed,
                     callback=recorder)
        return torch.stack([confidence for _, confidence, _, _ in recorder.frames])

    assert torch.equal(trajectory(1), trajectory(1))
    assert not torch.equal(trajectory(1), trajectory(2))


def test_shorter_text_is_the_window_with_an_end_of_text_tail(micro_model, spy_forward):
    """The model denoises its whole max_len window; seq_len only fixes the positions from there on
    to end-of-text (clean context), so text ends within seq_len and every step shows seq_len tokens."""
    model, tok, _ = micro_model
    seen, recorder = spy_forward(model), dlm.StepRecorder()
    out = dlm.generate(model, tok, ["", "The cats"], num_samples=3, seq_len=6,
                       cfg=dlm.SampleConfig(num_steps=4, guidance_scale=1.0), callback=recorder)
    assert all(x_t.shape[1] == model.config.max_len and torch.all(t[:, 6:] == 0) for x_t, t in seen)
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
