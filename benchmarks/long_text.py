"""Speed of long text: block diffusion with and without its context cache, against the causal LM
with a KV cache, on the same base, same machine, same run.

    python benchmarks/long_text.py --repeats 1    # about 6 minutes on a 2-core CPU; 3 repeats (the default) about 15
    # batch-1 latency at the default base's shape (Qwen2.5-0.5B, random weights): about 5 minutes
    python benchmarks/random_base.py --out /tmp/qwen2.5-0.5b-random
    python benchmarks/long_text.py --base /tmp/qwen2.5-0.5b-random --batch_sizes 1 --settings 8x4,2x2o --caches on

Both models are built on the same base (the built-in `tiny` Qwen2 by default) with a head over the
vocabulary of the Shakespeare lines (benchmarks/tinyshakespeare.txt). Speed depends on the
architecture, the lengths and the steps, not on the weights, so both are untrained; end-of-text is
masked out of the diffusion model's predictions, so that every sample runs to its full length, as
the causal LM's do. A diffusion sample of n tokens denoises n / B blocks of B tokens with K steps
each. Every row, the causal LM's too, is timed once a round, in turn: each time is the median of
--repeats rounds, and each ratio the median of the rounds' own ratios, as this machine's speed drifts
by a tenth within minutes (NOTES rows 103, 110). Prints a markdown table and writes
benchmarks/out/long_text.json.
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
from bench import CausalLM, median, seconds  # noqa: E402


def models(block_size, base="tiny", fold_last=False, one_stream=False):
    """(block diffusion model, its tokenizer, the causal LM), untrained, on `base`."""
    tok = dlm.load_tokenizer(base)
    lines = (ROOT / "benchmarks" / "tinyshakespeare.txt").read_text().splitlines()
    data = dlm.TextData([line for line in lines if line.strip()], tok, 32, dlm.end_of_text_id(tok))
    token_ids, _ = data.scan()
    torch.manual_seed(0)
    # as the trainer builds it
    config = dlm.model_config(dict(base_model=base, max_len=32, block_size=block_size, fold_last=fold_last,
                                   one_stream=one_stream))
    model = dlm.build_model(config, dlm.load_base_model(base), tok, token_ids).eval()
    end = model.vocab_index(torch.tensor([model.config.end_id]))
    forward = model.forward
    model.forward = lambda *a, **k: forward(*a, **k).index_fill(-1, end, -1e4)  # never ends early
    ar = CausalLM(dlm.load_base_model(base), model.vocab_ids, model.config.end_id).eval()
    return model, tok, ar


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="tiny", help="the base of both models: tiny, or a Qwen folder (default: tiny)")
    p.add_argument("--lengths", default="32,128,256", help="tokens per sample (default: 32,128,256)")
    # block size x steps per block: one token decided per step on average, and two
    p.add_argument("--settings", default="8x8,8x4,4x4", help="block size x steps per block, with f after it for "
                                                              "--fold_last (2x2f), o for --fold_last --one_stream "
                                                              "(2x2o) (default: 8x8,8x4,4x4)")
    p.add_argument("--caches", default="on,off", help="the diffusion rows with and without the cache (default: on,off)")
    p.add_argument("--batch_sizes", default="64,1", help="64: throughput, 1: latency (default: 64,1)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of timings, every row in turn; the median is kept")
    args = p.parse_args()
    lengths, batches = [int(n) for n in args.lengths.split(",")], [int(b) for b in args.batch_sizes.split(",")]
    settings = [(*(int(k) for k in s.rstrip("fo").split("x")), s[-1] in "fo", s.endswith("o"))
                for s in args.settings.split(",")]
    torch.set_num_threads(2)
    dlm.keep_freed_memory()  # as the scripts do (run_cli): a sample's vocabulary-sized tensors are not mapped afresh
    g = torch.Generator().manual_seed(0)
    built = []  # (row, model, tokenizer, sampling config) for every diffusion row
    for block_size, steps, fold_last, one_stream in settings:
        model, tok, ar = models(block_size, args.base, fold_last, one_stream)  # every setting's causal LM is the same
        for cache in [c == "on" for c in args.caches.split(",")]:
            row = dict(block_size=block_size, fold_last=fold_last, one_stream=one_stream, steps=steps, cache=cache)
            built.append((row, model, tok, dlm.SampleConfig(num_steps=steps, cache=cache)))
    rows, ar_rows = [], {}
    for n in lengths:
        # every row timed in turn, round after round, so that the machine's drift reaches them all alike
        times = {}
        for _ in range(args.repeats):
            for b in batches:
                for i, (_, model, tok, cfg) in enumerate(built):
                    times.setdefault((i, b), []).append(seconds(
                        lambda: dlm.generate(model, tok, [""], num_samples=b, seq_len=n, cfg=cfg, batch_size=64)))
                times.setdefault(("causal", b), []).append(seconds(lambda: ar.generate([[]] * b, n, g, stop=False)))
        for i, (row, *_) in enumerate(built):
            # the ratio to the causal LM is taken round by round, then the median: the drift between
            # rounds cancels, and a round's two timings are a few seconds apart
            rounds = {b: [d / c for d, c in zip(times[i, b], times["causal", b])] for b in batches}
            rows.append(dict(row, tokens=n, **{f"b{b}_s": median(times[i, b]) for b in batches},
                             **{f"b{b}_vs_causal": median(rounds[b]) for b in batches},
                             **{f"b{b}_rounds_vs_causal": rounds[b] for b in batches}))
            print(rows[-1], file=sys.stderr)
        ar_rows[n] = {f"b{b}_s": median(times["causal", b]) for b in batches}
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "long_text.json").write_text(
        json.dumps(dict(base=args.base, diffusion=rows, causal=ar_rows), indent=2))
    heads = [f"batch {b}: {'tokens/s' if b > 1 else 'latency'} | vs causal" for b in batches]
    print(f"| model | tokens | {' | '.join(heads)} |")
    print("| --- | --- |" + " --- | --- |" * len(batches))
    figure = lambda b, n, s: f"{b * n / s:.0f}" if b > 1 else f"{1000 * s:.0f} ms"
    for n in lengths:
        c = ar_rows[n]
        print(f"| causal LM, KV cache | {n} | "
              + " | ".join(f"{figure(b, n, c[f'b{b}_s'])} | 1" for b in batches) + " |")
        for r in (r for r in rows if r["tokens"] == n):
            folded = " in one stream" if r["one_stream"] else " folded" if r["fold_last"] else ""
            name = (f"blocks of {r['block_size']}{folded}, {r['steps']} steps each, "
                    f"{'cache' if r['cache'] else 'no cache'}")
            # throughput as a share of the causal LM's, latency as a multiple of its
            ratio = lambda b: 1 / r[f"b{b}_vs_causal"] if b > 1 else r[f"b{b}_vs_causal"]
            print(f"| {name} | {n} | " + " | ".join(f"{figure(b, n, r[f'b{b}_s'])} | {ratio(b):.2f}" for b in batches)
                  + " |")


if __name__ == "__main__":
    main()
