"""A second checkable corpus, held out: the recipe is never tuned on it, only checked.

Sentences about sailors and cargo, up to 20 words, with adjectives, numerals, chained phrases
and agreement at a distance:

    "Three tall sailors from the old harbour carry two heavy crates to the market."
    "The captain who hires four young sailors sells one crate today."

Three things must agree: a numeral with its noun ("one crate", "two crates"), the verb with its
subject across a phrase or a relative clause ("sailors ... carry", "captain ... sells"), and the
verb of a relative clause with the noun it hangs on. well_formed(text) decides membership exactly.

    python benchmarks/heldout_grammar.py            # train both models side by side, print the table

trains the diffusion model (train_with_custom_dataset.py, with the README's settings for any data)
and the causal LM of benchmarks/realtext.py from the random tiny base, for the same wall-clock
time, one thread each, and scores well-formed, distinct and novel samples, unconditional and on
prompts that end before the main verb.
"""

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

NUMBERS = {"sg": ["one"], "pl": ["two", "three", "four", "five", "six", "seven", "eight", "nine"]}
DETS = {"sg": ["the", "a", "every", "that"], "pl": ["the", "some", "those", "many"]}
ADJECTIVES = ["tall", "young", "old", "heavy", "wooden", "quiet", "proud", "tired"]
PEOPLE = {"sg": ["sailor", "captain", "merchant", "porter", "fisherman"],
          "pl": ["sailors", "captains", "merchants", "porters", "fishermen"]}
CARGO = {"sg": ["crate", "barrel", "sack", "chest", "rope"], "pl": ["crates", "barrels", "sacks", "chests", "ropes"]}
PLACES = ["harbour", "market", "island", "village", "ship"]
VERBS = {"sg": ["carries", "sells", "loads", "counts", "hides"], "pl": ["carry", "sell", "load", "count", "hide"]}
HIRE = {"sg": ["hires", "pays", "trusts"], "pl": ["hire", "pay", "trust"]}
ENDINGS = ["today", "again", "at dawn"]


def noun_phrase(rng, nouns, num, numeral):
    first = rng.choice(NUMBERS[num] if numeral else DETS[num])
    return [first] + [rng.choice(ADJECTIVES) for _ in range(rng.choice([0, 0, 1, 2]))] + [rng.choice(nouns[num])]


def subject(rng):
    """Words of a subject that may carry a place phrase or a relative clause, and its number."""
    num = rng.choice(["sg", "pl"])
    words = noun_phrase(rng, PEOPLE, num, rng.random() < 0.4)
    r = rng.random()
    if r < 0.35:
        words += [rng.choice(["from", "near"]), "the"] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []) \
            + [rng.choice(PLACES)]
    elif r < 0.7:  # the relative clause's verb agrees with the head noun, its object has the other number
        other = "pl" if num == "sg" else "sg"
        words += ["who", rng.choice(HIRE[num])] + noun_phrase(rng, PEOPLE, other, True)
    return words, num


def sentence(rng):
    words, num = subject(rng)
    words += [rng.choice(VERBS[num])] + noun_phrase(rng, CARGO, rng.choice(["sg", "pl"]), True)
    if rng.random() < 0.4:
        words += ["to", "the", rng.choice(PLACES)]
    if rng.random() < 0.3:
        words += rng.choice(ENDINGS).split()
    return " ".join(words).capitalize() + "."


def corpus(n=20000, seed=0):
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def prompts(n=200, seed=1):
    """Subjects whose main verb is not yet written."""
    rng = random.Random(seed)
    return [" ".join(subject(rng)[0]).capitalize() for _ in range(n)]


# ---------------------------------------------------------------- the exact check

def parse_np(w, i, nouns, numeral_only=False):
    """(end, number) of every noun phrase starting at w[i]."""
    out = []
    for num in ("sg", "pl"):
        firsts = NUMBERS[num] if numeral_only else NUMBERS[num] + DETS[num]
        if i < len(w) and w[i] in firsts:
            j = i + 1
            while j < len(w) and w[j] in ADJECTIVES and j - i <= 2:
                j += 1
            if j < len(w) and w[j] in nouns[num]:
                out.append((j + 1, num))
    return out


def parse_subject(w):
    ends = []
    for end, num in parse_np(w, 0, PEOPLE):
        ends.append((end, num))
        if end < len(w) and w[end] in ("from", "near") and end + 1 < len(w) and w[end + 1] == "the":
            k = end + 2 + (end + 2 < len(w) and w[end + 2] in ADJECTIVES)
            if k < len(w) and w[k] in PLACES:
                ends.append((k + 1, num))
        if end + 1 < len(w) and w[end] == "who" and w[end + 1] in HIRE[num]:
            ends += [(k, num) for k, other in parse_np(w, end + 2, PEOPLE, True) if other != num]
    return ends


def well_formed(text):
    """True iff `text` is exactly one sentence of this grammar."""
    if not text.endswith(".") or text != text.strip() or "  " in text or not text[:1].isupper():
        return False
    w = text[:-1].split(" ")
    w[0] = w[0].lower()
    for end, num in parse_subject(w):
        if end < len(w) and w[end] in VERBS[num]:
            for k, _ in parse_np(w, end + 1, CARGO, True):
                rest = w[k:]
                if rest[:2] == ["to", "the"] and len(rest) >= 3 and rest[2] in PLACES:
                    rest = rest[3:]
                if not rest or " ".join(rest) in ENDINGS:
                    return True
    return False


# ---------------------------------------------------------------- the benchmark

def main():
    import torch

    import dlm_common as dlm
    import realtext as rt

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--learning_rate", type=float, default=1e-3, help="both models' (default: the README's for any data)")
    p.add_argument("--diffusion_args", default="--block_size 2 --fold_last --one_stream --train_embeddings",
                   help="the diffusion model's training flags (default: the README's real-text recipe from a random "
                        "base; \"\": the whole window, row 60)")
    p.add_argument("--sample", default="", help="SampleConfig overrides for the diffusion model, field=value,...")
    p.add_argument("--reuse", action="store_true")
    args = p.parse_args()
    out = ROOT / "benchmarks" / "out" / "heldout_grammar"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.txt"
    train = corpus()
    data.write_text("\n".join(train) + "\n")
    dlm.load_base_model("tiny")
    diffusion = [sys.executable, str(ROOT / "train_with_custom_dataset.py"), "--dataset", str(data), "--base_model",
                 "tiny", "--batch_size", "64", "--learning_rate", str(args.learning_rate), "--max_minutes",
                 str(args.minutes), "--num_epochs", "1000", "--output_dir", str(out / "diffusion"), "--overwrite",
                 *args.diffusion_args.split()]
    causal = [sys.executable, str(ROOT / "benchmarks" / "realtext.py"), "causal", "--out", str(out / "causal"),
              "--minutes", str(args.minutes), "--dataset", str(data), "--learning_rate", str(args.learning_rate)]
    if not (args.reuse and (out / "diffusion" / "config.json").exists()):
        rt.side_by_side(diffusion, causal, logs=out)
    torch.set_num_threads(2)
    dlm.keep_freed_memory()
    model, tok = dlm.load(out / "diffusion")
    ar = rt.load_causal(out / "causal")
    sample = {k: rt.parse_value(getattr(dlm.SampleConfig, k), v)
              for k, v in (kv.split("=") for kv in filter(None, args.sample.split(",")))}
    train_set = set(train)
    n = args.samples
    cfg = dlm.SampleConfig(num_steps=20, **sample)
    score = lambda texts: dict(well_formed=sum(map(well_formed, texts)) / len(texts),
                               distinct=len(set(texts)) / len(texts),
                               novel=sum(t not in train_set for t in texts) / len(texts))
    diffusion_texts = lambda texts: [s["text"] for s in dlm.generate(model, tok, texts, seq_len=64, cfg=cfg, seed=1,
                                                                      batch_size=250)]
    ask = prompts(n)
    encoded = tok(ask, add_special_tokens=False)["input_ids"]
    rows = {
        "causal LM, unconditional": score([tok.decode(c) for c in rt.causal_completions(ar, [[]] * n)]),
        "diffusion, unconditional, 20 steps": score(diffusion_texts([""] * n)),
        "causal LM, prompts": score([a + tok.decode(c) for a, c in zip(ask, rt.causal_completions(ar, encoded))]),
        "diffusion, prompts, 20 steps": score(diffusion_texts(ask)),
    }
    steps = dict(diffusion=json.loads((out / "diffusion" / "trainer_state.json").read_text())["pos"]["step"],
                 causal=json.loads((out / "causal" / "steps.json").read_text())["steps"])
    (out / "results.json").write_text(json.dumps(dict(rows=rows, steps=steps, sample=sample,
                                                      learning_rate=args.learning_rate,
                                                      diffusion_args=args.diffusion_args), indent=1))
    print(f"{args.minutes} min each, learning rate {args.learning_rate:g}; optimiser steps: diffusion "
          f"{steps['diffusion']}, causal LM {steps['causal']}; window {model.config.max_len}; block size "
          f"{model.config.block_size}; sampler {sample or 'default'}")
    print(f"\n| {n} samples per row | well-formed | distinct | novel |\n| --- | --- | --- | --- |")
    for name, s in rows.items():
        print(f"| {name} | {100 * s['well_formed']:.2f}% | {100 * s['distinct']:.2f}% | {100 * s['novel']:.2f}% |")


if __name__ == "__main__":
    main()
