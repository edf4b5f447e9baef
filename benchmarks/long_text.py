"""Speed of long text: block diffusion with and without its context cache, against the causal LM
with a KV cache, on the same base, same machine, same run.

    python benchmarks/long_text.py --repeats 1    # about 10 minutes on a 2-core CPU; 3 repeats (the default) about 25

Both models are the built-in `tiny` Qwen2 with a head over the vocabulary of the Shakespeare
lines (benchmarks/tinyshakespeare.txt). Speed depends on the architecture, the lengths and the
steps, not on the weights, so both are untrained; end-of-text is masked out of the diffusion
model's predictions, so that every sample runs to its full length, as the causal LM's do. A
diffusion sample of n tokens denoises n / B blocks of B tokens with K steps each. Prints a
markdown table and writes benchmarks/out/long_text.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import dlm_common as dlm  # noqa: E402
from bench import CausalLM, median_time  # noqa: E402

LENGTHS = (32, 128, 256)
# (block size B, steps per block K): one token decided per step on average, and two
SETTINGS = ((8, 8), (8, 4), (4, 4))


def models(block_size):
    """(block diffusion model, its tokenizer, the causal LM), untrained, on the tiny base."""
    tok = dlm.load_tokenizer("tiny")
    lines = (ROOT / "benchmarks" / "tinyshakespeare.txt").read_text().splitlines()
    data = dlm.TextData([line for line in lines if line.strip()], tok, 32, dlm.end_of_text_id(tok))
    token_ids, _ = data.scan()
    torch.manual_seed(0)
    config = dlm.DLMConfig(base_model="tiny", max_len=32, block_size=block_size)
    model = dlm.build_model(config, dlm.load_base_model("tiny"), tok, token_ids).eval()
    end = model.vocab_index(torch.tensor([model.config.end_id]))
    forward = model.forward
    model.forward = lambda *a, **k: forward(*a, **k).index_fill(-1, end, -1e4)  # never ends early
    ar = CausalLM(dlm.load_base_model("tiny"), model.vocab_ids, model.config.end_id).eval()
    return model, tok, ar


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timings per figure; the median is kept")
    args = p.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    rows, ar_rows = [], {}
    for block_size, steps in SETTINGS:
        model, tok, ar = models(block_size)
        for cache in (True, False):
            cfg = dlm.SampleConfig(num_steps=steps, cache=cache)
            for n in LENGTHS:
                one = lambda b: dlm.generate(model, tok, [""], num_samples=b, seq_len=n, cfg=cfg, batch_size=64)
                rows.append(dict(block_size=block_size, steps=steps, cache=cache, tokens=n,
                                 b64_tokens_per_s=64 * n / median_time(lambda: one(64), args.repeats),
                                 b1_latency_s=median_time(lambda: one(1), args.repeats)))
                print(rows[-1], file=sys.stderr)
        for n in LENGTHS:
            if n not in ar_rows:
                ar_rows[n] = dict(b64_tokens_per_s=64 * n / median_time(lambda: ar.generate([[]] * 64, n, g, stop=False),
                                                                        args.repeats),
                                  b1_latency_s=median_time(lambda: ar.generate([[]], n, g, stop=False), args.repeats))
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "long_text.json").write_text(json.dumps(dict(diffusion=rows, causal=ar_rows), indent=2))
    print("| model | tokens | batch 64: tokens/s | vs causal | batch 1: latency | vs causal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in LENGTHS:
        c = ar_rows[n]
        print(f"| causal LM, KV cache | {n} | {c['b64_tokens_per_s']:.0f} | 1 | {1000 * c['b1_latency_s']:.0f} ms | 1 |")
        for r in (r for r in rows if r["tokens"] == n):
            name = f"blocks of {r['block_size']}, {r['steps']} steps each, {'cache' if r['cache'] else 'no cache'}"
            print(f"| {name} | {n} | {r['b64_tokens_per_s']:.0f} | {r['b64_tokens_per_s'] / c['b64_tokens_per_s']:.2f} "
                  f"| {1000 * r['b1_latency_s']:.0f} ms | {r['b1_latency_s'] / c['b1_latency_s']:.2f} |")


if __name__ == "__main__":
    main()
