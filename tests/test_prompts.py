"""Prompt completion: verbatim prompts, guidance semantics, batching, flags."""

import json

import pytest
import torch

import dlm_common as dlm
import modeling_dlm
from helpers import run_script

PROMPTS = ["The cats near the dog", "A farmer", "Zebras éat 42 «quoted» words", "", "  spaced  "]


def test_every_output_starts_with_its_prompt_verbatim(micro_model):
    model, tok, _ = micro_model
    vocab = set(model.vocab_ids.tolist())
    # the third prompt's tokens are outside the diffusion vocabulary: context, never generated
    assert not set(tok(PROMPTS[2], add_special_tokens=False)["input_ids"]) <= vocab
    for scale in (0.0, 1.0, 5.0):
        out = dlm.generate(model, tok, PROMPTS, num_samples=2, seq_len=16,
                           cfg=dlm.SampleConfig(num_steps=4, guidance_scale=scale))
        assert [o["prompt"] for o in out] == [p for p in PROMPTS for _ in range(2)]
        for o in out:
            assert o["text"] == o["prompt"] + o["completion"] and o["text"].startswith(o["prompt"])
            n = len(tok(o["prompt"], add_special_tokens=False)["input_ids"])
            assert o["token_ids"][:n] == tok(o["prompt"], add_special_tokens=False)["input_ids"]


def test_guidance_scale_one_is_the_limit_of_the_guided_path(micro_model, spy_forward):
    """At s = 1 sampling runs the conditional model alone, one pass per step. Just below and just
    above 1 it runs the guided path (the conditional and the unconditional model in one batch, and
    above 1 the guards): both must tend to the same samples."""
    model, tok, data = micro_model
    dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=3e-3, num_epochs=2))
    samples = lambda s: [o["token_ids"] for o in dlm.generate(
        model, tok, PROMPTS[:2], num_samples=3, seq_len=16, cfg=dlm.SampleConfig(num_steps=6, guidance_scale=s),
        seed=4)]
    calls = spy_forward(model)
    at_one = samples(1.0)
    assert {len(x_t) for x_t, _ in calls} == {6}  # two prompts, three samples each: the conditional batch
    for s in (1 - 1e-6, 1 + 1e-6):
        calls.clear()
        assert samples(s) == at_one, s
        assert {len(x_t) for x_t, _ in calls} == {12}, s  # the conditional and the unconditional batch


def test_guidance_extrapolates_and_stays_a_distribution(micro_model):
    model, tok, _ = micro_model
    ids, is_prompt = dlm.encode_prompts(tok, ["The cats near"], 16, model.config.end_id)
    x_t = torch.randn(1, 16, model.dim)
    t = torch.full((1, 16), 0.5)
    x0_prompt = model.embed(ids)
    with torch.no_grad():
        out = {s: dlm.guided_log_probs(model, x_t, t, torch.zeros_like(x_t), x0_prompt, is_prompt, s, 0.99)
               for s in (0.0, 1.0, 5.0)}
    lp = {s: pred.log_probs for s, pred in out.items()}
    # what steers the trajectory: the conditional prediction when extrapolating, else the guided one
    assert torch.allclose(out[5.0].steering, lp[1.0]) and torch.equal(out[0.0].steering, lp[0.0])
    for s, v in lp.items():
        assert torch.allclose(v.exp().sum(-1), torch.ones(1, 16), atol=1e-5), s
    assert not torch.allclose(lp[0.0], lp[1.0])  # the unconditional model ignores the prompt
    # with s > 1 a decision may pick only tokens the conditional model finds plausible, a mask of its
    # own: the guided scores themselves keep every token
    cond = lp[1.0]
    plausible = cond >= cond.max(-1, keepdim=True).values + torch.log(torch.tensor(0.99))
    assert not out[0.0].extrapolating and not out[1.0].extrapolating
    assert torch.equal(out[5.0].allowed, plausible) and not plausible.all()
    assert torch.isfinite(lp[5.0]).all()


def test_guidance_above_one_acts_only_on_the_decided_tokens(micro_model, monkeypatch):
    """With s > 1, the trajectory follows the conditional model's estimate; the guided scores only
    choose the token a position is decided to, among the tokens guidance allows."""
    model, tok, data = micro_model
    dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=3e-3, num_epochs=1))
    guided, estimate, rounding, steps, estimated = dlm.guided_log_probs, dlm.x0_estimate, dlm.nearest_neighbour, [], []

    def recording(*args):
        steps.append(guided(*args))
        return steps[-1]

    def recording_estimate(scores, *args):
        estimated.append(scores)
        return estimate(scores, *args)

    def checked(x, E, allowed=None, chunk=4096):
        idx = rounding(x, E, allowed, chunk)
        assert allowed is not None and allowed.gather(-1, idx.unsqueeze(-1)).all()
        return idx

    monkeypatch.setattr(modeling_dlm, "guided_log_probs", recording)  # where the sampler looks them up
    monkeypatch.setattr(modeling_dlm, "x0_estimate", recording_estimate)
    monkeypatch.setattr(modeling_dlm, "nearest_neighbour", checked)
    dlm.generate(model, tok, PROMPTS[:2], num_samples=3, seq_len=16,
                 cfg=dlm.SampleConfig(num_steps=6, guidance_scale=5.0), seed=1)
    assert steps and all(pred.extrapolating for pred in steps)
    assert all(not torch.allclose(pred.log_probs, pred.steering) for pred in steps)
    # every estimate is made of rows of one kind of scores: the decided positions' of the guided ones,
    # the trajectory's (the positions left open) of the conditional ones, never the guided ones
    rows = lambda kind: torch.cat([getattr(pred, kind).reshape(-1, pred.steering.shape[-1]) for pred in steps])
    of = lambda e, kind: all((rows(kind) == row).all(-1).any() for row in e)
    estimated = [e for e in estimated if len(e)]  # the last step leaves no position open
    decided, steering = [e for e in estimated if of(e, "log_probs")], [e for e in estimated if of(e, "steering")]
    assert decided and steering and len(decided) + len(steering) == len(estimated)


def test_empty_prompt_is_unconditional_generation(micro_model):
    model, tok, _ = micro_model
    cfg = dlm.SampleConfig(num_steps=4)
    ids = lambda cfg: [o["token_ids"] for o in dlm.generate(model, tok, [""], num_samples=3, seq_len=16, cfg=cfg, seed=2)]
    assert ids(cfg) == ids(dlm.SampleConfig(num_steps=4, guidance_scale=9.0))


def test_prompt_file_runs_in_batches(micro_model, monkeypatch):
    """200 prompts, batch 64: four sampling loops, not 200."""
    model, tok, _ = micro_model
    calls = []
    real = dlm.sample
    monkeypatch.setattr(dlm, "sample", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    out = dlm.generate(model, tok, [f"The cat {i}" for i in range(200)], seq_len=16, cfg=dlm.SampleConfig(num_steps=2),
                       batch_size=64)
    assert calls == [64, 64, 64, 8] and len(out) == 200


@pytest.mark.slow
def test_generate_with_prompt_cli(trained_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat\n\nSome dogs near the bird\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = run_script("generate_with_prompt.py", "--model_dir", trained_dir, "--prompt_file", prompts, "--num_samples", 2,
                   "--seq_len", 16, "--num_steps", 3, "--guidance_scale", 2, "--output", out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["The cat", "The cat", "Some dogs near the bird", "Some dogs near the bird"]
    assert all(set(rec) >= {"prompt", "completion", "text", "token_ids"} for rec in records)
    assert all(rec["text"] == rec["prompt"] + rec["completion"] for rec in records)
    assert r.stdout.splitlines() == [rec["text"] for rec in records]


@pytest.mark.slow
def test_generate_with_prompt_empty_prompt_cli(trained_dir):
    r = run_script("generate_with_prompt.py", "--model_dir", trained_dir, "--prompt", "", "--seq_len", 8,
                   "--num_steps", 2)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
