"""Quality of long text: 256-token samples of a block diffusion model against a causal LM trained
for the same wall-clock time on the same packed Shakespeare windows.

    python benchmarks/long_text_quality.py --minutes 8 --judge_minutes 8    # about 20 minutes on 2 cores (NOTES rows 66, 84)

The text is benchmarks/tinyshakespeare.txt in chunks of 40 lines (JSONL rows, the first 90% train,
the rest held out), packed into 256-token windows (--pack). Rows:
- the causal LM: the random `tiny` base trained as an ordinary causal LM (benchmarks/realtext.py's);
- the block diffusion model (--diffusion_args, by default the real-text recipe from a random base:
  blocks of 2 without self-conditioning, folded into one stream, their embeddings trained) from
  the same base, through train_with_custom_dataset.py, beside it, one thread each;
- held-out windows, as the reference.
Each samples 256 tokens unconditionally. Metrics: perplexity under a judge (a larger causal LM
trained first on the same windows, never an initialisation), unigram entropy, distinct bigrams,
repetition (the share of 4-grams that already occurred earlier in the same sample) and length.
Writes benchmarks/out/long_text/results.json and prints a markdown table.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import dlm_common as dlm  # noqa: E402
import realtext  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "long_text"
WINDOW, LINES_PER_ROW = 256, 40
RECIPE = dict(batch_size=16, learning_rate=1e-3)


def write_rows():
    lines = realtext.DATA.read_text(encoding="utf-8").splitlines()
    rows = ["\n".join(lines[i:i + LINES_PER_ROW]) for i in range(0, len(lines), LINES_PER_ROW)]
    cut = int(0.9 * len(rows))
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in [("train.jsonl", rows[:cut]), ("heldout.jsonl", rows[cut:])]:
        (OUT / name).write_text("".join(json.dumps({"text": r}) + "\n" for r in part))


def windows(name, tok):
    data = dlm.TextData(OUT / name, tok, WINDOW, dlm.end_of_text_id(tok), dlm.DataConfig(pack=True))
    data.scan()
    return data


def train_causal(out, minutes, threads, judge):
    """realtext's causal LM (or judge) on the packed training windows, over the ids of all the rows."""
    tok = dlm.load_tokenizer("tiny")
    texts = [json.loads(line)["text"] for name in ("train.jsonl", "heldout.jsonl") for line in open(OUT / name)]
    realtext.fit_causal(out, windows("train.jsonl", tok), tok, texts, minutes, threads, judge=judge, **RECIPE)


def causal_command(out, minutes, threads=1, judge=False):
    return [sys.executable, __file__, "causal", "--out", str(out), "--minutes", str(minutes), "--threads",
            str(threads), *(["--judge"] if judge else [])]


def score(samples, judge):
    """samples: lists of token ids, each up to (not including) its end-of-text."""
    nll, n = realtext.judge_nll(judge, [[]] * len(samples), samples, batch=16)
    entropy, distinct_bigrams = realtext.diversity(samples)
    repeated = total = 0
    for s in samples:
        seen = set()
        for gram in zip(s, s[1:], s[2:], s[3:]):
            repeated += gram in seen
            total += 1
            seen.add(gram)
    return dict(judge_ppl=math.exp(nll / n), entropy=entropy, distinct_bigrams=distinct_bigrams,
                repeated_4grams=repeated / max(total, 1), tokens=sum(map(len, samples)) / len(samples))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "causal"])
    p.add_argument("--out")
    p.add_argument("--minutes", type=float, default=8)
    p.add_argument("--judge_minutes", type=float, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--judge", action="store_true")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--diffusion_args", default="--block_size 2 --fold_last --one_stream --train_embeddings",
                   help="the diffusion model's training flags (default: blocks of 2 folded into one stream, "
                        "embeddings trained, the recipe from a random base, NOTES rows 95, 96 and 100; row 66: "
                        "--block_size 8 --self_cond_prob 0.25)")
    args = p.parse_args()
    if args.what == "causal":
        return train_causal(args.out, args.minutes, args.threads, args.judge)
    write_rows()
    if not (OUT / "judge" / "steps.json").exists():
        realtext.side_by_side(causal_command(OUT / "judge", args.judge_minutes, threads=2, judge=True), logs=OUT)
    diffusion = [sys.executable, str(ROOT / "train_with_custom_dataset.py"), "--dataset", str(OUT / "train.jsonl"),
                 "--pack", "--max_len", str(WINDOW), "--base_model", "tiny", *(f"--{k}={v}" for k, v in RECIPE.items()),
                 *args.diffusion_args.split(),
                 "--max_minutes", str(args.minutes), "--num_epochs", "1000", "--output_dir", str(OUT / "diffusion"),
                 "--overwrite"]
    realtext.side_by_side(diffusion, causal_command(OUT / "causal", args.minutes), logs=OUT)
    torch.set_num_threads(2)
    tok = dlm.load_tokenizer("tiny")
    end_id = dlm.end_of_text_id(tok)
    judge, causal = realtext.load_causal(OUT / "judge"), realtext.load_causal(OUT / "causal")
    model, _ = dlm.load(OUT / "diffusion")
    held = windows("heldout.jsonl", tok)
    reference = [realtext.cut_at_end(ids.tolist(), end_id) for ids in next(held.batches(args.samples, 0, 0)).ids]
    rows = {"held-out windows": score(reference, judge)}
    g = torch.Generator().manual_seed(1)
    rows["causal LM"] = score(causal.generate([[]] * args.samples, WINDOW, g), judge)
    size = model.config.block_size
    for name, extra in [("rounded", dict(draw=False)), ("drawn at 1.0", dict(draw=True)),
                        ("drawn at 0.9", dict(draw=True, temperature=0.9))]:
        cfg = dlm.SampleConfig(num_steps=size, **extra)  # one token a step (NOTES row 74)
        out = dlm.generate(model, tok, [""], num_samples=args.samples, seq_len=WINDOW, cfg=cfg, seed=1)
        rows[f"diffusion, blocks of {size}, {name}"] = score([s["token_ids"] for s in out], judge)
    steps = {name: json.loads((OUT / name / "steps.json").read_text())["steps"] for name in ("causal",)}
    steps["diffusion"] = json.loads((OUT / "diffusion" / "trainer_state.json").read_text())["pos"]["step"]
    (OUT / "results.json").write_text(json.dumps(dict(rows=rows, steps=steps), indent=2))
    print(f"optimiser steps: causal {steps['causal']}, diffusion {steps['diffusion']}")
    print("| row | judge ppl | entropy | distinct bigrams | repeated 4-grams | tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['judge_ppl']:.0f} | {r['entropy']:.2f} | {r['distinct_bigrams']:.2f} | "
              f"{r['repeated_4grams']:.2f} | {r['tokens']:.0f} |")


if __name__ == "__main__":
    main()
