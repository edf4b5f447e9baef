"""Outputs recorded before a refactor: training and sampling must give the same after it (the same ids;
the trained loss to a relative 1e-4, since CPUs differ in the last bits).

The numbers below were recorded with torch 2.13.0 on the CPU (`DLM_RECORD=1 python -m pytest
tests/test_recorded.py -s` prints them). A change that means to alter training or sampling records them again, and says
so in its commit; a refactor must leave them as they are.
"""

import os

import pytest
import torch

import dlm_common as dlm
from helpers import micro_denoiser

PROMPTS = ["The cats near the dog", "A farmer", ""]
# name -> (SampleConfig fields, block size of the model)
CASES = {
    "guidance 5": (dict(num_steps=6), 0),
    "guidance 1": (dict(num_steps=6, guidance_scale=1.0), 0),
    "guidance 0.5": (dict(num_steps=6, guidance_scale=0.5), 0),
    "drawn": (dict(num_steps=6, draw=True, temperature=0.9), 0),
    "order noise, eta 1, 40 steps": (dict(num_steps=40, order_noise=1.0, eta=1.0), 0),
    "blocks of 4": (dict(num_steps=5, order="confidence", draw=False), 4),
    "blocks of 4, left to right and drawn (their defaults)": (dict(num_steps=5), 4),
}
RECORDED = {
    'trained loss 0': 3.856616497039795,
    'trained loss 4': 3.992466926574707,
    'guidance 5': [[785, 19423, 3143, 279, 5562, 8473, 8609, 2264, 11958, 11958, 11079, 8609, 71390, 11510, 13007, 13007], [785, 19423, 3143, 279, 5562, 8609, 11510, 2264, 11958, 11958, 11510, 20336, 71390, 11510, 13007, 13007], [32, 36400, 11477, 71390, 13007, 13007, 13007, 11510, 13007, 13007, 11958, 67241, 13007, 36400, 11510, 11958], [32, 36400, 11477, 11510, 13007, 13007, 13007, 36400, 13007, 13007, 11958, 67241, 13007, 36400, 11510, 11958], [20336, 11477, 13007, 20336, 11477, 9485, 11510, 11510, 11477, 13007, 13007, 13007, 9485, 13007, 9485, 13007], [36400, 9485, 20336, 11477, 11477, 13007, 11510, 11477, 11510, 13007, 13007, 9485, 13007, 13007, 9485, 13007]],
    'guidance 1': [[785, 19423, 3143, 279, 5562, 11477, 36400, 13007, 11958, 11958, 11477, 13007, 11510, 11510, 13007, 13007], [785, 19423, 3143, 279, 5562, 13007, 36400, 13007, 11958, 11958, 11477, 11477, 11510, 11510, 13007, 13007], [32, 36400, 20336, 13007, 13007, 13007, 13007, 11477, 71390, 13007, 13007, 36400, 13007, 11477, 11510, 13007], [32, 36400, 20336, 13007, 13007, 13007, 13007, 11477, 20336, 11510, 13007, 13007, 13007, 11477, 11510, 13007], [20336, 11477, 13007, 20336, 11477, 9485, 11510, 11510, 11477, 13007, 13007, 13007, 9485, 13007, 9485, 13007], [36400, 9485, 20336, 11477, 11477, 13007, 11510, 11477, 11510, 13007, 13007, 9485, 13007, 13007, 9485, 13007]],
    'guidance 0.5': [[785, 19423, 3143, 279, 5562, 13007, 71390, 11477, 11477, 11510, 13007, 9485, 1492, 9485, 1492, 11510], [785, 19423, 3143, 279, 5562, 11477, 11477, 36400, 11510, 13007, 13007, 9485, 9485, 1492, 264, 1492], [32, 36400, 9485, 11477, 20336, 11510, 13007, 13007, 11477, 11510, 9485, 36400, 1492, 1492, 1492, 9485], [32, 36400, 20336, 9485, 11477, 11510, 13007, 13007, 36400, 9485, 11510, 1492, 11477, 1492, 1492, 9485], [20336, 11477, 13007, 20336, 11477, 9485, 11510, 11510, 11477, 13007, 13007, 13007, 9485, 13007, 9485, 13007], [36400, 9485, 20336, 11477, 11477, 13007, 11510, 11477, 11510, 13007, 13007, 9485, 13007, 13007, 9485, 13007]],
    'drawn': [[785, 19423, 3143, 279, 5562, 419, 11510, 5562, 11958, 11958, 71390, 419, 11510, 1414, 13007, 13007], [785, 19423, 3143, 279, 5562, 419, 11510, 5562, 11958, 11958, 20336, 419, 11510, 419, 13007, 13007], [32, 36400, 13007, 71390, 11958, 13007, 13007, 8473, 419, 5562, 785, 264, 13007, 264, 11510, 11958], [32, 36400, 13007, 11510, 11958, 13007, 13007, 2310, 419, 13007, 785, 67241, 13007, 419, 11510, 11958], [11510, 264, 419, 11079, 13007, 9485, 11340, 11477, 36400, 264, 13007, 13007, 9485, 11958, 12590, 13007], [71390, 9485, 13007, 11340, 11477, 13007, 419, 11510, 1492, 11340, 11477, 12590, 13007, 12590, 9485, 13007]],
    'order noise, eta 1, 40 steps': [[785, 19423, 3143, 279, 5562, 13007, 20336, 20336, 5562, 1414, 12590, 8441, 36400, 36400, 71390, 71390], [785, 19423, 3143, 279, 5562, 67241, 71390, 29566, 13007, 12590, 36400, 36400, 20336, 1549, 264, 419], [32, 36400, 20336, 36400, 264, 3351, 36400, 264, 264, 71390, 20336, 20336, 1414, 67241, 20336, 1414], [32, 36400, 36400, 264, 419, 20336, 3351, 20336, 5562, 13151, 71390, 1414, 1414, 36400, 1414, 264], [71390, 15289, 1414, 67241, 1414, 12590, 36400, 1414, 71390, 36400, 20336, 67241, 264, 1414, 264, 264], [67241, 1414, 36400, 264, 20336, 20336, 264, 13007, 15289, 1414, 1414, 36400, 12590, 1414, 32, 264]],
    'blocks of 4': [[785, 19423, 3143, 279, 5562, 264, 264, 13007, 264, 1414, 1414, 264, 1414, 1414, 264, 264], [785, 19423, 3143, 279, 5562, 264, 264, 13007, 264, 1414, 1414, 264, 1414, 1414, 264, 264], [32, 36400, 264, 13007, 264, 264, 264, 13007, 264, 1414, 264, 264, 264, 1414, 264, 264], [32, 36400, 264, 13007, 264, 1414, 264, 13007, 264, 1414, 264, 264, 264, 1414, 264, 264], [264, 264, 264, 13007, 264, 1414, 264, 264, 264, 1414, 264, 264, 264, 1414, 264, 264], [264, 264, 264, 13007, 264, 1414, 264, 264, 264, 1414, 264, 264, 264, 1414, 264, 264]],
    'blocks of 4, left to right and drawn (their defaults)': [[785, 19423, 3143, 279, 5562, 20336, 1414, 1493, 1414, 1414, 1414, 1414, 1682, 19423, 36400, 32], [785, 19423, 3143, 279, 5562, 8788, 11510, 785, 1549, 1598, 29566, 67241, 1682, 36400, 12590, 1414], [32, 36400, 8251, 8473, 8171, 264, 36400, 32, 264, 264, 36400, 264, 264, 264, 11017, 419], [32, 36400, 2264, 264, 264, 11477, 419, 12590, 264, 264, 20336, 264, 419, 429, 419, 36400], [11017, 264, 11017, 12590, 1682, 264, 1414, 1414, 264, 1414, 419, 419, 264, 15223, 13151, 419], [1493, 1414, 1414, 3783, 1414, 71390, 32, 264, 32, 13151, 8251, 1414, 1414, 264, 419, 12590]],
}


def trained_loss(model, data):
    """The trained model's loss on a fixed batch with fixed noise. Not a hash of its weights' bytes: two
    CPUs can round the same training differently in the last bits (one machine's hashes of 8d78c56's
    weights were not another's, while every sampled id below was the same)."""
    with torch.no_grad():
        return dlm.diffusion_loss(model, next(data.batches(16, 0, 0)).ids, torch.Generator().manual_seed(0)).item()


def trained(micro_base, corpus, block_size):
    """A micro model after two epochs, then shaken so that samples vary from token to token: a few
    steps of training alone give mostly full stops, which would hide a change."""
    model, tok, data = micro_denoiser(micro_base, corpus, block_size=block_size)
    dlm.train(model, data, dlm.TrainConfig(batch_size=16, learning_rate=3e-3, num_epochs=2))
    loss = trained_loss(model, data)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model, tok, loss


def outputs(micro_base, corpus):
    """Every recorded number, computed afresh."""
    models = {b: trained(micro_base, corpus, b) for b in (0, 4)}
    out = {f"trained loss {b}": loss for b, (_, _, loss) in models.items()}
    for name, (fields, b) in CASES.items():
        model, tok, _ = models[b]
        samples = dlm.generate(model, tok, PROMPTS, num_samples=2, seq_len=16, cfg=dlm.SampleConfig(**fields), seed=3)
        out[name] = [s["token_ids"] for s in samples]
    return out


@pytest.fixture(scope="module")
def computed(micro_base, corpus):
    out = outputs(micro_base, corpus)
    if os.environ.get("DLM_RECORD"):  # DLM_RECORD=1 python -m pytest tests/test_recorded.py -s
        print("\nRECORDED = {\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in out.items()) + "}")
    return out


@pytest.mark.parametrize("name", RECORDED)
def test_output_is_the_recorded_one(computed, name):
    expected = RECORDED[name]
    assert computed[name] == (pytest.approx(expected, rel=1e-4) if name.startswith("trained loss") else expected)
