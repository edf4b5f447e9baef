"""Block diffusion (--block_size): causal across blocks, bidirectional within, next-token outputs."""

import pytest
import torch

import dlm_common as dlm
from helpers import end_of_text_logit, micro_denoiser, run_main


@pytest.fixture(params=[False, True], ids=["every_token", "fold_last"])
def block_model(micro_base, corpus, request):
    """A block model of either noisy stream; a folding one with its fold layer no longer zero, as if
    trained, so that what it folds shows."""
    model, tok, data = micro_denoiser(micro_base, corpus, block_size=4, fold_last=request.param)
    if request.param:
        torch.nn.init.normal_(model.fold.weight, std=0.1)
    return model, tok, data


def changed(a, b):
    """Positions (of row 0) whose logits differ."""
    return [j for j in range(a.shape[1]) if not torch.allclose(a[0, j], b[0, j], atol=1e-6)]


def decided_first(model, ids, x_t, t):
    """The model's inputs with the first token of every block of 2 decided, as the trainer and the
    sampler give it: (x_t, t, x0_cond)."""
    x0, first = model.embed(ids), (torch.arange(ids.shape[1]) % 2 == 0)[:, None]
    return torch.where(first, x0, x_t), t.masked_fill(first[:, 0], 0.0), torch.where(first, x0, 0.0)


def unprompted(model, rows, cfg, **kwargs):
    """dlm.sample of `rows` 16-token texts without a prompt, seed 0."""
    end = model.config.end_id
    return dlm.sample(model, torch.full((rows, 16), end), torch.zeros(rows, 16, dtype=torch.bool), cfg,
                      torch.Generator().manual_seed(0), **kwargs)


def test_grouped_attention_gives_transformers_own_logits_and_samples(block_model):
    """A block model's masked passes read the key and value heads that the query heads share in place
    (grouped_sdpa), where transformers' SDPA copies them out per head: the same logits in training, the
    same samples from the cached sampler, whose first pass of a block is masked."""
    model, tok, data = block_model
    assert model.body.config._attn_implementation == "grouped_sdpa"
    ids = next(data.batches(4, 0, 0))[1]
    x0, t = model.embed(ids), torch.full(ids.shape, 0.5)
    logits, samples = [], []
    for attention in ("grouped_sdpa", "sdpa"):
        model.body.set_attn_implementation(attention)
        with torch.no_grad():
            logits.append(model(x0, t, torch.zeros_like(x0), clean_ids=ids))
        samples.append(dlm.generate(model, tok, ["", "The cats"], num_samples=2, seq_len=24,
                                    cfg=dlm.SampleConfig(num_steps=2), seed=1))
    assert torch.allclose(*logits, atol=1e-5)
    assert samples[0] == samples[1]


def test_attention_is_causal_across_blocks_and_bidirectional_within(block_model):
    """Token j is predicted from position j - 1: within a block from the noisy stream, which sees its
    whole block; the first token of a block from the clean stream, which sees the tokens before it."""
    model, tok, data = block_model
    ids = next(data.batches(4, 0, 0))[1]
    x0, t = model.embed(ids), torch.full(ids.shape, 0.5)
    with torch.no_grad():
        out = model(x0, t, torch.zeros_like(x0), clean_ids=ids)
        noisy = x0.clone()
        noisy[:, 9] += 1.0  # block 2 holds tokens 8-11
        assert changed(out, model(noisy, t, torch.zeros_like(x0), clean_ids=ids)) == [9, 10, 11]
        other = ids.clone()
        other[:, 9] = ids[:, 3]
        assert changed(out, model(x0, t, torch.zeros_like(x0), clean_ids=other)) == [12, 13, 14, 15]


def test_one_block_at_a_time_matches_the_whole_window(block_model):
    """Sampling runs one block with the clean tokens before it; training runs the whole window with
    the whole clean text: the logits of a block are the same either way."""
    model, tok, data = block_model
    ids = next(data.batches(4, 0, 0))[1]
    x0, t = model.embed(ids), torch.rand(ids.shape)
    with torch.no_grad():
        whole = model(x0, t, x0, clean_ids=ids)
        for lo in range(0, 16, 4):
            part = model(x0[:, lo:lo + 4], t[:, lo:lo + 4], x0[:, lo:lo + 4], clean_ids=ids[:, :lo], offset=lo)
            assert torch.allclose(part, whole[:, lo:lo + 4], atol=1e-5), lo


def test_block_model_trains_saves_and_samples(block_model, tmp_path):
    model, tok, data = block_model
    log = dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=3e-3, num_epochs=3))
    assert log[-1]["loss"] < log[0]["loss"] or len(log) == 1
    dlm.save(model, tok, tmp_path / "m")
    loaded, _ = dlm.load(tmp_path / "m")
    assert loaded.config.block_size == 4
    cfg = dlm.SampleConfig(num_steps=3)
    a = dlm.generate(model, tok, ["", "The cats near the dog"], num_samples=2, seq_len=16, cfg=cfg, seed=1)
    b = dlm.generate(loaded, tok, ["", "The cats near the dog"], num_samples=2, seq_len=16, cfg=cfg, seed=1)
    assert a == b
    assert all(s["text"].startswith(s["prompt"]) for s in a)


def test_block_sampling_stops_after_the_block_where_every_text_ended(block_model, spy_forward):
    """Once every row has an end-of-text, later blocks are not denoised: they are end-of-text."""
    model, tok, _ = block_model
    end = model.config.end_id
    calls = spy_forward(model, change=end_of_text_logit(model, 100.0))  # the model predicts end-of-text everywhere
    ids = unprompted(model, 2, dlm.SampleConfig(num_steps=3, order="confidence"), progress=False)
    assert torch.all(ids == end)
    # the first pass decided the first token of the first block; most confident first, the threshold
    # decided the rest of the block at the first denoising step (left to right, it decides only the
    # leftmost early); no other block ran
    assert len(calls) == 2


def test_a_block_model_shows_one_progress_bar_over_its_blocks(block_model, spy_forward, capsys):
    """Beyond one block the bar counts blocks, not each block's steps: one bar a sample, not a bar
    that flashes 0/K for every block."""
    model, tok, _ = block_model
    spy_forward(model, change=end_of_text_logit(model, -100.0))  # never ends: all 4 blocks of 16 tokens
    unprompted(model, 1, dlm.SampleConfig(num_steps=3))
    bars = capsys.readouterr().err
    assert "0/4 [" in bars and "block/s" in bars and "/2 [" not in bars  # 2: the steps after a block's first


def test_unless_told_a_block_model_takes_a_step_per_token_of_a_block(block_model, spy_forward):
    """The default (num_steps 0) is not the training discretisation's 1,000 steps a block, most of which
    would only wait for the decisions they space out, but the block size: one token a step."""
    model, tok, _ = block_model
    calls = spy_forward(model, change=end_of_text_logit(model, -100.0))  # never ends: all 4 blocks of 16 tokens
    ids = [unprompted(model, 2, dlm.SampleConfig(num_steps=steps), progress=False) for steps in (0, 4)]
    assert len(calls) == 2 * 4 * 4 and torch.equal(*ids)


def test_left_to_right_the_threshold_decides_only_the_leftmost_open_position(block_model, spy_forward):
    """A later position's prediction was made while the tokens before it were still noise, so
    however sure it is, it waits for them: the block of 4 takes its 4 steps, one token each."""
    model, tok, _ = block_model
    calls = spy_forward(model, change=end_of_text_logit(model, 100.0))
    unprompted(model, 2, dlm.SampleConfig(num_steps=4), progress=False)
    assert [int((t == 0).sum()) for _, t in calls] == [0, 2, 4, 6]  # decided positions enter at level 0


@pytest.mark.parametrize("self_cond_prob", [0.0, 0.75])
def test_the_estimate_is_fed_back_only_to_a_model_trained_with_it(block_model, monkeypatch, self_cond_prob):
    """Self-conditioning: the previous clean estimate enters at the open positions of a model trained
    with it; one trained without (--self_cond_prob 0) has only seen zeros there, and gets zeros."""
    model, tok, _ = block_model
    monkeypatch.setattr(model.config, "self_cond_prob", self_cond_prob)
    seen, forward = [], model.forward

    def recording(x_t, t, x0_cond, *rest, **kwargs):
        seen.append((t.clone(), x0_cond.clone()))
        return forward(x_t, t, x0_cond, *rest, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    dlm.sample(model, torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.bool),
               dlm.SampleConfig(num_steps=4), torch.Generator().manual_seed(0), progress=False)
    fed_back = [bool(x0_cond[t > 0].abs().sum() > 0) for t, x0_cond in seen[1:]]  # after the first step
    assert any(fed_back) == (self_cond_prob > 0)
    assert all(x0_cond[t == 0].norm(dim=-1).gt(0.99).all() for t, x0_cond in seen)  # decided: their token


def trained_block_model(block_model):
    model, tok, data = block_model
    dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=3e-3, num_epochs=2))
    return model.eval(), tok


def test_the_cache_gives_the_logits_of_the_whole_text(block_model):
    """With a ContextCache, the text before a block is run once and kept; the block's logits are those
    of running the whole text at every step, beyond the trained window too."""
    model, tok, data = block_model
    ids = torch.cat([next(data.batches(4, 0, 0))[1]] * 3, 1)  # 48 tokens from a 16-token model
    x0, t = model.embed(ids), torch.rand(ids.shape)
    cache = dlm.ContextCache()
    with torch.no_grad():
        for lo in range(0, 48, 4):
            block = slice(lo, lo + 4)
            plain = model(x0[:, block], t[:, block], x0[:, block], clean_ids=ids[:, :lo], offset=lo)
            for _ in range(2):  # two denoising steps of the block: the second reads the cache only
                cached = model(x0[:, block], t[:, block], x0[:, block], clean_ids=ids[:, :lo], offset=lo, cache=cache)
                assert torch.allclose(cached, plain, atol=1e-5), lo
            assert cache.length == lo + 1  # the start token and the text before the block, nothing of the block


def test_a_block_model_samples_beyond_its_window_the_same_with_and_without_the_cache(block_model, spy_forward):
    model, tok = trained_block_model(block_model)
    no_end = end_of_text_logit(model, -100.0)
    spy_forward(model, change=no_end)  # the text never ends: every one of the 40 positions is sampled
    prompts = ["", "The cats near the dog"]
    samples = {cache: dlm.generate(model, tok, prompts, num_samples=2, seq_len=40, seed=1,
                                   cfg=dlm.SampleConfig(num_steps=4, cache=cache)) for cache in (True, False)}
    assert [s["token_ids"] for s in samples[True]] == [s["token_ids"] for s in samples[False]]
    assert all(len(s["token_ids"]) == 40 for s in samples[True])
    assert all(s["text"].startswith(s["prompt"]) for s in samples[True])


def test_a_block_s_later_tokens_are_denoised_only_once_its_first_is_decided(block_model, spy_forward):
    """Training predicts a block's later tokens only from a clean first token: the sampler's first pass
    over a block runs the block's first position alone and decides it, and every later pass reads it
    clean, with the passes of the block's num_steps (3) left for the rest; a prompt that fills a
    block's first position leaves all of them to the rest."""
    model, tok, data = block_model
    calls = spy_forward(model, change=end_of_text_logit(model, -100.0))
    prompt = torch.zeros(2, 16, dtype=torch.long)
    is_prompt = torch.arange(16).expand(2, 16) < 5  # the prompt fills block 1's first position
    dlm.sample(model, prompt, is_prompt, dlm.SampleConfig(num_steps=3), torch.Generator().manual_seed(0),
               progress=False)
    assert [x_t.shape[1] for x_t, _ in calls] == [4, 4, 4] + [1, 4, 4] * 2
    assert all((t[:, 0] == 0).all() for x_t, t in calls if x_t.shape[1] > 1)


def test_the_decided_text_is_cached_in_the_next_block_s_first_step(block_model, spy_forward, monkeypatch):
    """With the cache, a block's first pass also runs the block decided before it (to keep its keys and
    values): one transformer pass per step, none of its own for the clean text."""
    model, tok, data = block_model
    no_end = end_of_text_logit(model, -100.0)
    steps = spy_forward(model, change=no_end)
    passes, transformer = [], model.transformer
    monkeypatch.setattr(model, "transformer", lambda h, *a, **k: passes.append(h.shape[1]) or transformer(h, *a, **k))
    dlm.generate(model, tok, [""], seq_len=24, cfg=dlm.SampleConfig(num_steps=3))
    assert len(steps) == len(passes) == 6 * 3  # 24 tokens: six blocks of 4, three passes each
    # each block's first pass: the start token or the 4 tokens decided last, and the block's first token
    # (none with the last token folded into the one before: it is the last of one); then its noisy
    # stream (4 positions, or 3 folded)
    stream = 3 if model.config.fold_last else 4
    first = stream - 3
    assert passes[::3] == [1 + first] + [4 + first] * 5 and set(passes) - set(passes[::3]) == {stream}


@pytest.mark.slow
def test_seq_len_beyond_a_block_model_s_positions_is_refused(block_model, tmp_path):
    model, tok = trained_block_model(block_model)
    dlm.save(model, tok, tmp_path / "m")
    limit = model.longest
    status, err = run_main("dlm_test.py", "--model_dir", tmp_path / "m", "--seq_len", limit + 1)
    assert status == 2 and len(err.strip().splitlines()) == 1 and f"({limit} tokens" in err
    status, err = run_main("dlm_test.py", "--model_dir", tmp_path / "m", "--seq_len", 24, "--num_steps", 2)
    assert status == 0 and "note" not in err


def test_guidance_given_to_a_block_model_says_it_does_not_apply(block_model, tmp_path):
    """A block model reads a prompt as clean context, so the seed README's --guidance_scale 5.0 is
    a note, and samples as without it."""
    model, tok = trained_block_model(block_model)
    dlm.save(model, tok, tmp_path / "m")
    outputs = []
    for guidance in ([], ["--guidance_scale", 5.0]):
        status, err = run_main("generate_with_prompt.py", "--model_dir", tmp_path / "m", "--prompt", "The cats",
                               "--num_steps", 2, "--output", tmp_path / "out.jsonl", *guidance)
        assert status == 0 and ("--guidance_scale does not apply" in err) == bool(guidance)
        outputs.append((tmp_path / "out.jsonl").read_text())
    assert outputs[0] == outputs[1]


def test_training_decides_a_prefix_of_every_block():
    """A block model trains on blocks whose first 1 .. size - 1 tokens are decided, the states the
    sampler leaves a block in as it decides it left to right; each block draws its own."""
    g = torch.Generator().manual_seed(0)
    decided = dlm.decided_prefix(4, 64, 18, lambda *shape: torch.rand(*shape, generator=g), "cpu")
    for lo in range(0, 18, 4):
        block = decided[:, lo:lo + 4]
        j = block.sum(1)
        assert (block == (torch.arange(block.shape[1]) < j.unsqueeze(1))).all()  # a prefix
        assert j.min() == 1 and j.max() == min(3, block.shape[1])
        if block.shape[1] == 4:
            assert set(j.tolist()) == {1, 2, 3}


def test_a_block_model_trains_up_to_the_block_where_the_text_ends(block_model):
    """Blocks past every row's end-of-text are dropped from training (the sampler never reaches
    them), but an end-of-text inside the text, as packing leaves, does not end it."""
    model, tok, data = block_model
    ids = next(data.batches(4, 0, 0))[1]
    end = model.config.end_id
    loss = lambda x: dlm.diffusion_loss(model, x, torch.Generator().manual_seed(0)).item()
    assert loss(ids) == loss(torch.cat([ids, torch.full((4, 8), end)], 1))
    packed = ids.clone()
    packed[:, 4] = end
    other_tail = packed.clone()
    other_tail[:, 5:] = end
    assert loss(packed) != loss(other_tail)


def test_a_block_model_trains_without_self_conditioning_unless_told():
    """--block_size alone turns self-conditioning off (NOTES row 79); a --self_cond_prob given still wins.
    It folds the last token of a block only when told (--fold_last, row 95), and trains the embeddings
    only when told (--train_embeddings, row 96)."""
    assert dlm.model_config({}).self_cond_prob == dlm.DLMConfig.self_cond_prob > 0
    assert dlm.model_config({"block_size": 2}).self_cond_prob == 0
    assert dlm.model_config({"block_size": 2, "self_cond_prob": 0.5}).self_cond_prob == 0.5
    assert not dlm.model_config({"block_size": 2}).fold_last
    assert dlm.model_config({"block_size": 2, "fold_last": True}).fold_last
    with pytest.raises(dlm.DLMError, match="add --block_size"):
        dlm.model_config({"fold_last": True})
    assert not dlm.model_config({"block_size": 2}).train_embeddings  # Qwen's rows, unless --train_embeddings
    assert dlm.model_config({"train_embeddings": True}).train_embeddings


def test_folding_the_last_token_starts_from_next_token_prediction_and_feeds_it_only_its_own(micro_base, corpus):
    """With fold_last, blocks of 2 have one noisy-stream position a block, the decided first token's,
    and the second token's noisy input reaches it only through the zero-initialised fold layer: a new
    model predicts every token from the clean text alone, as the base does; once the layer is not zero,
    a token's noisy input moves its own prediction and no other."""
    model, tok, data = micro_denoiser(micro_base, corpus, block_size=2, fold_last=True)
    ids = next(data.batches(4, 0, 0))[1]
    x0 = model.embed(ids)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    logits = lambda x_t, t: model(*decided_first(model, ids, x_t, t), clean_ids=ids)
    half = torch.full(ids.shape, 0.5)
    with torch.no_grad():
        out = logits(x0, half)
        assert changed(out, logits(noise, torch.rand(ids.shape))) == []
        torch.nn.init.normal_(model.fold.weight, std=0.1)
        out = logits(x0, half)
        other = x0.clone()
        other[:, 5] = noise[:, 5]  # the second token of block 2
        assert changed(out, logits(other, half)) == [5]


def test_a_config_json_from_before_folding_keeps_every_token_s_position(block_model):
    """config.json files written before fold_last existed lack it: they load with the stream they were
    trained with. The field must be a JSON boolean."""
    model, _, _ = block_model
    values = model.config.to_diff_dict()
    assert dlm.parse_config(values).fold_last == model.config.fold_last
    del values["fold_last"]
    assert dlm.parse_config(values).fold_last is False
    with pytest.raises(ValueError, match="fold_last is 1, not a bool"):
        dlm.parse_config({**values, "fold_last": 1})


@pytest.fixture
def one_stream_model(micro_base, corpus):
    """Blocks of 2 in one stream (--one_stream), its fold layer no longer zero, as if trained."""
    model, tok, data = micro_denoiser(micro_base, corpus, block_size=2, fold_last=True, one_stream=True)
    torch.nn.init.normal_(model.fold.weight, std=0.1)
    return model, tok, data


def test_one_stream_reads_each_token_clean_after_it_and_noisy_where_it_is_predicted(one_stream_model):
    """With --one_stream, position p holds token p - 1 and predicts token p, causally: a clean token
    moves the predictions of the tokens after it only, and a block's second token's noisy input, read
    at the position that predicts it, moves that prediction and the later ones (their context holds
    that position), never an earlier one."""
    model, tok, data = one_stream_model
    ids = next(data.batches(4, 0, 0))[1]
    noise = torch.randn(model.embed(ids).shape, generator=torch.Generator().manual_seed(0))
    half = torch.full(ids.shape, 0.5)
    with torch.no_grad():
        out = model(*decided_first(model, ids, noise, half), clean_ids=ids)
        other = noise.clone()
        other[:, 5] += 1.0  # the second token of block 2 (tokens 4 and 5)
        assert changed(out, model(*decided_first(model, ids, other, half), clean_ids=ids)) == list(range(5, 16))
        for j in (4, 5):
            other = ids.clone()
            other[:, j] = ids[:, 3] if ids[0, 3] != ids[0, j] else ids[:, 2]
            assert changed(out, model(*decided_first(model, ids, noise, half), clean_ids=other)) == list(range(j + 1, 16))


def test_one_stream_samples_a_block_as_it_trains_with_and_without_the_cache(one_stream_model):
    """A block sampled after the text before it, decided (its second tokens read clean), gets the
    logits the whole window gets with that text clean and the block as it is; the cache without
    cache_decided gives the same, beyond the trained window too, and keeps the text before the block
    only."""
    model, tok, data = one_stream_model
    ids = torch.cat([next(data.batches(4, 0, 0))[1]] * 3, 1)  # 48 tokens from a 16-token model
    x0 = model.embed(ids)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1))
    cache = dlm.ContextCache()
    with torch.no_grad():
        for lo in range(0, 48, 2):
            block = slice(lo, lo + 2)
            noisy = (torch.arange(48) == lo + 1)[:, None]  # the block's second token; all else clean
            x_t, t_b, _ = decided_first(model, ids, torch.where(noisy, noise, x0), t.masked_fill(~noisy[:, 0], 0.0))
            x0_cond = torch.where(noisy, 0.0, x0)  # every token but the block's second is decided
            whole = model(x_t, t_b, x0_cond, clean_ids=ids)[:, block]
            plain = model(x_t[:, block], t_b[:, block], x0_cond[:, block], clean_ids=ids[:, :lo], offset=lo)
            assert torch.allclose(plain, whole, atol=1e-5), lo
            for _ in range(2):
                cached = model(x_t[:, block], t_b[:, block], x0_cond[:, block], clean_ids=ids[:, :lo], offset=lo,
                               cache=cache)
                assert torch.allclose(cached, plain, atol=1e-5), lo
            assert cache.length == lo + 1
    no_end = end_of_text_logit(model, -100.0)
    forward = model.forward
    model.forward = lambda *a, **k: no_end(forward(*a, **k))
    samples = {cache: [s["token_ids"] for s in dlm.generate(model, tok, ["", "The cats near the dog"], num_samples=2,
                                                            seq_len=40, seed=1, cfg=dlm.SampleConfig(
                                                                num_steps=2, cache=cache, cache_decided=False))]
               for cache in (True, False)}
    assert samples[True] == samples[False] and all(len(s) == 40 for s in samples[True])


def test_one_stream_s_cache_keeps_each_block_as_the_pass_that_decided_it_read_it(one_stream_model, monkeypatch):
    """With cache_decided (the default), a block's pass keeps its one position, the first token's,
    which reads the second noisy, and the next block's first pass runs only the second token's: the
    logits are those training computes on the whole text with every second token noisy, beyond the
    trained window too, and every pass of a sample runs one position, as a causal LM's does."""
    model, tok, data = one_stream_model
    ids = torch.cat([next(data.batches(4, 0, 0))[1]] * 3, 1)  # 48 tokens from a 16-token model
    noise = torch.randn(model.embed(ids).shape, generator=torch.Generator().manual_seed(0))
    x_t, t, x0_cond = decided_first(model, ids, noise, torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)))
    positions, transformer = [], model.transformer
    monkeypatch.setattr(model, "transformer", lambda h, *a, **k: positions.append(h.shape[1]) or transformer(h, *a, **k))
    cache = dlm.ContextCache(decided=True)
    with torch.no_grad():
        whole = model(x_t, t, x0_cond, clean_ids=ids)
        for lo in range(0, 48, 2):
            first = slice(lo, lo + 1)  # the block's first pass, which decides its first token
            cached = model(x_t[:, first], t[:, first], x0_cond[:, first], clean_ids=ids[:, :lo], offset=lo, cache=cache)
            assert torch.allclose(cached, whole[:, first], atol=1e-5), lo
            block = slice(lo, lo + 2)
            for _ in range(2):  # two denoising steps: the second replaces the position the first kept
                cached = model(x_t[:, block], t[:, block], x0_cond[:, block], clean_ids=ids[:, :lo], offset=lo,
                               cache=cache)
                assert torch.allclose(cached, whole[:, block], atol=1e-5), lo
            assert cache.length == lo + 1 and cache.pending
        no_end = end_of_text_logit(model, -100.0)
        forward = model.forward
        model.forward = lambda *a, **k: no_end(forward(*a, **k))
        positions.clear()
        samples = dlm.generate(model, tok, ["", "The cats near the dog"], num_samples=2, seq_len=40, seed=1,
                               cfg=dlm.SampleConfig(num_steps=2))
    assert positions == [1] * 40 and all(len(s["token_ids"]) == 40 for s in samples)  # a pass a token


def test_one_stream_trains_saves_and_loads_and_needs_folded_blocks_of_2(one_stream_model, tmp_path):
    model, tok, data = one_stream_model
    log = dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=3e-3, num_epochs=3, log_every=1))
    assert log[-1]["loss"] < log[0]["loss"] - 0.2
    dlm.save(model, tok, tmp_path / "m")
    loaded, _ = dlm.load(tmp_path / "m")
    assert loaded.config.one_stream and torch.equal(loaded.fold.weight, model.fold.weight)
    assert "one_stream" in dlm.MODEL_FLAGS
    for given in ({"one_stream": True}, {"one_stream": True, "block_size": 2}, {"one_stream": True, "block_size": 4,
                                                                                "fold_last": True}):
        with pytest.raises(dlm.DLMError, match="needs --block_size 2 --fold_last"):
            dlm.model_config(given)
    values = model.config.to_diff_dict()
    del values["one_stream"]
    assert dlm.parse_config(values).one_stream is False  # folders saved before the field: two streams


def test_a_block_model_drawing_its_tokens_never_embeds_the_whole_vocabulary(one_stream_model, monkeypatch):
    """The vocabulary's embeddings (all of Qwen's rows with --vocab full) are computed when a step needs
    every row, to round a token or to estimate a position still open after it, and then once a sample;
    a block model that draws its tokens and decides a block in its steps needs neither."""
    model, tok, data = one_stream_model
    calls, vocab_embeddings = [], model.vocab_embeddings
    monkeypatch.setattr(model, "vocab_embeddings", lambda: calls.append(1) or vocab_embeddings())
    unprompted(model, 2, dlm.SampleConfig(), progress=False)
    assert calls == []
    unprompted(model, 2, dlm.SampleConfig(draw=False), progress=False)
    assert calls == [1]
