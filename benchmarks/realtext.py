"""Real text: the diffusion LM against a causal LM on Shakespeare, from a random and from a pretrained base.

    python benchmarks/realtext.py     # the full run: about 30 minutes on 2 cores, plus 25 for the judge, once
    python benchmarks/realtext.py --minutes 0.5 --judge_minutes 0.5 --samples 40     # a smoke run

The data is benchmarks/tinyshakespeare.txt, one example per non-blank line (at most 20 tokens, 9 on
average): the first 90% of the lines train, the last 10% are held out. Rows, all trained in this run,
on this machine, for the same wall-clock budget, two at a time side by side with one thread each:

- causal LM from the random `tiny` base (an ordinary Qwen2 causal LM, tied embeddings, trained on
  the data's token ids). Saved with save_pretrained, it is the *pretrained stand-in*: the only
  "pretrained Qwen" there can be offline;
- diffusion from the random `tiny` base, through train_with_custom_dataset.py (beside the first),
  with --diffusion_args and --random_args: the recipe from a random base;
- causal LM continued from the stand-in, for the same budget again;
- diffusion adapted from the stand-in (--base_model <stand-in folder>, --diffusion_args), beside
  it. This is the row to hold against the continued causal LM.

Metrics, on --samples samples per row (the held-out lines are the reference row):
- judge perplexity: per token (end-of-text included) under a larger causal LM trained longer on the
  training lines (cached in benchmarks/out/realtext/judge), never used as an initialisation;
- trigram perplexity: an interpolated Kneser-Ney trigram model of the training lines;
- unigram entropy (nats, of all the samples' tokens together), distinct bigrams (unique / all),
  words per sample, empty samples, samples copied from the training lines;
- prompted: the first three words of held-out lines of six words or more, completed; the judge's
  perplexity of the completion given the prompt, its entropy and its length in words;
- the diffusion rows at 10, 20 and 50 steps, and with the rounded and the drawn sampler;
- training speed: tokens per second of each diffusion model and of the causal LM on the same batches.

Both trainers keep freed memory (dlm.keep_freed_memory), so neither pays for page faults. Prints
markdown tables and writes benchmarks/out/realtext/results.json. --reuse keeps the models found in
benchmarks/out/realtext; --tag, --diffusion_args and --sample try variants of the diffusion rows.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dlm_common as dlm  # noqa: E402
import bench  # noqa: E402
from bench import fit  # noqa: E402

DATA = ROOT / "benchmarks" / "tinyshakespeare.txt"
OUT = ROOT / "benchmarks" / "out" / "realtext"
# both kinds of model train with these; the README's real-text quick start uses the same
RECIPE = dict(batch_size=64, learning_rate=1e-3)
# the diffusion model picks its own window (the longest line plus end-of-text: 21 tokens here); the
# causal LM trims each batch to its longest line, and samples at most this many tokens
MAX_LEN = 32
# the judge: twice the width and one and a half times the depth of the tiny base, trained longer
JUDGE_CONFIG = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2)
PROMPT_WORDS = 3
# The diffusion rows sample twice: "rounded" (each decided position takes the nearest embedding to the
# clean estimate: a whole-window model's default), and "drawn" (--draw) at a temperature that puts the
# samples' unigram entropy within 5% of the held-out lines' (blocks of 2 at 1.0, NOTES rows 82 and 85; a
# whole window at 0.9, row 52), and, on prompts, with guidance 1: above it completions get short and
# narrow (row 57).
DRAWN = dict(draw=True, temperature=1.0, guidance_scale=1.0)


# ---------------------------------------------------------------- data

def split_lines():
    """(training lines, held-out lines): the first 90% of the non-blank lines, and the rest."""
    lines = [line.strip() for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    cut = int(0.9 * len(lines))
    return lines[:cut], lines[cut:]


def write_split():
    train, held_out = split_lines()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, lines in [("train.txt", train), ("heldout.txt", held_out)]:
        if not (OUT / name).exists():
            (OUT / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return OUT / "train.txt"


# ---------------------------------------------------------------- the causal LMs

class CausalLM(bench.CausalLM):
    """A Qwen2 causal LM whose embeddings (tied, as in Qwen2.5) are trained only on the rows of the
    data's token ids: a 151,936-row softmax and its Adam moments would cost more than the model.
    Unlike the grammar benchmark's, its input embeddings train, as an ordinary causal LM's do; the
    loss is that one's."""

    def __init__(self, base, vocab_ids, end_id):
        nn.Module.__init__(self)
        self.base, self.end_id = base, end_id
        self.base.model.get_input_embeddings().weight.requires_grad_(False)
        self.register_buffer("vocab_ids", vocab_ids)
        self.rows = nn.Parameter(base.model.get_input_embeddings().weight[vocab_ids].detach().clone())

    def embed(self, ids):
        """Input embeddings: the trained row for ids in the vocabulary, the base's own for others."""
        index = torch.searchsorted(self.vocab_ids, ids).clamp(max=len(self.vocab_ids) - 1)
        known = (self.vocab_ids[index] == ids).unsqueeze(-1)
        return torch.where(known, self.rows[index], self.base.model.get_input_embeddings()(ids))

    def hidden(self, ids, cache=None):
        return self.base.model(inputs_embeds=self.embed(ids), past_key_values=cache,
                               use_cache=cache is not None).last_hidden_state

    @property
    def head_weight(self):
        return self.rows

    def nll(self, ids, first):
        """Summed negative log-likelihood of ids[:, first:] (B,) given what precedes them; an
        end-of-text is prepended, and positions holding end-of-text after the first one are padding."""
        ids = torch.cat([torch.full((len(ids), 1), self.end_id), ids], 1)
        logp = F.log_softmax(self(ids[:, :-1]).float(), -1)
        target = ids[:, 1:]
        index = torch.searchsorted(self.vocab_ids, target).clamp(max=len(self.vocab_ids) - 1)
        nll = -logp.gather(-1, index.unsqueeze(-1))[..., 0]
        is_end = target == self.end_id
        counted = (torch.arange(target.shape[1]) >= first.unsqueeze(1)) & ((is_end.cumsum(1) - is_end.long()) == 0)
        return (nll * counted).sum(1), counted.sum(1)

    @torch.no_grad()
    def generate(self, prompts, max_len, generator):
        """Sample (temperature 1, KV cache) a continuation of each prompt (lists of ids, all the same
        length) until end-of-text or max_len tokens in all; returns the new ids of each row."""
        from transformers import DynamicCache

        self.eval()
        ids = torch.tensor([[self.end_id] + p for p in prompts])
        cache, out = DynamicCache(config=self.base.config), []
        done = torch.zeros(len(ids), dtype=torch.bool)
        for _ in range(max_len - len(prompts[0])):
            logits = self(ids, cache)[:, -1].float()
            nxt = self.vocab_ids[torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]]
            nxt = torch.where(done, self.end_id, nxt)
            done |= nxt == self.end_id
            out.append(nxt)
            ids = nxt[:, None]
            if done.all():
                break
        return [cut_at_end(row, self.end_id) for row in torch.stack(out, 1).tolist()]

    def save(self, path, tokenizer):
        """A plain Qwen2ForCausalLM folder, usable as --base_model; vocab.json restores the rows."""
        self.base.model.get_input_embeddings().weight.data[self.vocab_ids] = self.rows.data
        self.base.save_pretrained(path)
        tokenizer.save_pretrained(path)
        (Path(path) / "vocab.json").write_text(json.dumps(dict(vocab_ids=self.vocab_ids.tolist(), end_id=self.end_id)))


def load_causal(path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = json.loads((Path(path) / "vocab.json").read_text())
    return CausalLM(base, torch.tensor(vocab["vocab_ids"]), vocab["end_id"]).eval()


def cut_at_end(ids, end_id):
    return ids[: ids.index(end_id)] if end_id in ids else ids


def vocabulary(tok, lines, end_id):
    ids = {i for seq in tok(lines, add_special_tokens=False)["input_ids"] for i in seq}
    return torch.tensor(sorted(ids | {end_id}))


def train_causal(out, minutes, init, threads, judge=False, seed=0, dataset=None, learning_rate=RECIPE["learning_rate"]):
    """Train a causal LM on the training lines (or the lines of `dataset`): fit_causal, with a vocabulary
    of the training lines (the judge's: the held-out lines' too, as it must score any of their ids)."""
    tok = dlm.load_tokenizer("tiny")
    train, held_out = split_lines()
    if dataset:
        train = dlm.read_lines(dataset)
    data = dlm.TextData(train, tok, MAX_LEN, dlm.end_of_text_id(tok))
    data.scan()
    return fit_causal(out, data, tok, train + held_out if judge else train, minutes, threads, init, judge, seed,
                      RECIPE["batch_size"], learning_rate)


def fit_causal(out, data, tok, vocab_lines, minutes, threads, init=None, judge=False, seed=0,
               batch_size=RECIPE["batch_size"], learning_rate=RECIPE["learning_rate"]):
    """Train a causal LM over the ids of `vocab_lines` on `data` (a scanned TextData) for `minutes`, from
    `init` (a folder) or from a random base (the tiny one, or the judge's size), and save it to `out`
    with steps.json; returns the optimiser steps."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(threads)
    dlm.keep_freed_memory()  # as the diffusion trainer does, so that neither pays for page faults
    torch.manual_seed(seed)
    end_id = dlm.end_of_text_id(tok)
    base = (Qwen2ForCausalLM(Qwen2Config(**{**dlm.TINY_CONFIG, **JUDGE_CONFIG})) if judge
            else dlm.load_base_model(init or "tiny"))
    model = CausalLM(base, vocabulary(tok, vocab_lines, end_id), end_id)
    cfg = dlm.TrainConfig(batch_size=batch_size, learning_rate=learning_rate, max_minutes=minutes)
    step = fit(model, data, cfg, seed)
    model.save(out, tok)
    (Path(out) / "steps.json").write_text(json.dumps(dict(steps=step, minutes=minutes)))
    return step


def train_diffusion(out, minutes, init, extra=()):
    """The command that trains a diffusion row through the project's own CLI."""
    return [sys.executable, str(ROOT / "train_with_custom_dataset.py"), "--dataset", str(OUT / "train.txt"),
            "--base_model", str(init or "tiny"), *(f"--{k}={v}" for k, v in RECIPE.items()),
            "--max_minutes", str(minutes), "--num_epochs", "1000", "--output_dir", str(out), "--overwrite", *extra]


def causal_command(out, minutes, init=None, threads=1, judge=False):
    return [sys.executable, __file__, "causal", "--out", str(out), "--minutes", str(minutes), "--threads", str(threads),
            *(["--init", str(init)] if init else []), *(["--judge"] if judge else [])]


def side_by_side(*commands, logs=OUT):
    """Run the commands at once, one thread each, so they see the same machine. Each one's stderr goes
    to a file: a pipe read only at the end fills up, and its writer stops (NOTES row 50)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    files = [open(Path(logs) / f"child{i}.log", "w+") for i in range(len(commands))]
    children = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=f) for cmd, f in zip(commands, files)]
    for cmd, child, f in zip(commands, children, files):
        child.wait()
        f.seek(0)
        if child.returncode:
            sys.exit(f"{' '.join(cmd[:3])} failed:\n{f.read()[-2000:]}")


# ---------------------------------------------------------------- the n-gram judge

class KneserNey:
    """Interpolated Kneser-Ney trigram model over token ids (Chen & Goodman 1998), one discount;
    the unigram level is add-one smoothed, so no id has probability 0."""

    def __init__(self, sequences, vocab_size, d=0.75):
        self.d, self.V = d, vocab_size
        self.c3, self.c2 = Counter(), Counter()
        for seq in sequences:
            s = [-1, -1] + list(seq) + [-2]
            self.c3.update(zip(s, s[1:], s[2:]))
        self.ctx3, self.follow3 = Counter(), Counter()  # c(a b .), distinct c after (a b)
        self.cont2, self.ctx2, self.follow2 = Counter(), Counter(), Counter()  # N(. b c), N(. b .), distinct c in N(. b c)
        for (a, b, c), n in self.c3.items():
            self.ctx3[a, b] += n
            self.follow3[a, b] += 1
            self.cont2[b, c] += 1
        for (b, c) in self.cont2:
            self.ctx2[b] += self.cont2[b, c]
            self.follow2[b] += 1
        self.cont1 = Counter()  # N(. c): distinct b before c
        for (b, c) in self.cont2:
            self.cont1[c] += 1
        self.total1 = sum(self.cont1.values())

    def prob(self, a, b, c):
        p = (self.cont1[c] + 1) / (self.total1 + self.V)
        if self.ctx2[b]:
            p = (max(self.cont2[b, c] - self.d, 0) + self.d * self.follow2[b] * p) / self.ctx2[b]
        if self.ctx3[a, b]:
            p = (max(self.c3[a, b, c] - self.d, 0) + self.d * self.follow3[a, b] * p) / self.ctx3[a, b]
        return p

    def nll(self, prompt, completion):
        """Summed negative log-likelihood of completion + end, given prompt; and its token count."""
        s = [-1, -1] + list(prompt) + list(completion) + [-2]
        start = 2 + len(prompt)
        return -sum(math.log(self.prob(s[i - 2], s[i - 1], s[i])) for i in range(start, len(s))), len(s) - start


# ---------------------------------------------------------------- scoring

def diversity(samples):
    """(unigram entropy, nats, of all the samples' tokens together; distinct bigrams, unique / all) of
    samples, lists of token ids."""
    tokens = [i for s in samples for i in s]
    entropy = -sum(k / len(tokens) * math.log(k / len(tokens)) for k in Counter(tokens).values()) if tokens else 0.0
    bigrams = [b for s in samples for b in zip(s, s[1:])]
    return entropy, len(set(bigrams)) / max(1, len(bigrams))


def judge_nll(judge, prompts, completions, batch=128):
    """Summed judge NLL and token count of each completion (end-of-text included) given its prompt."""
    total, count = 0.0, 0
    for lo in range(0, len(prompts), batch):
        rows = [p + c + [judge.end_id] for p, c in zip(prompts[lo: lo + batch], completions[lo: lo + batch])]
        width = max(map(len, rows))
        ids = torch.tensor([r + [judge.end_id] * (width - len(r)) for r in rows])
        first = torch.tensor([len(p) for p in prompts[lo: lo + batch]])
        with torch.no_grad():
            nll, n = judge.nll(ids, first)
        total, count = total + nll.sum().item(), count + n.sum().item()
    return total, count


def score(tok, prompts, completions, judge, trigram, train_set):
    """The metrics of one row: completions are lists of token ids (no end-of-text)."""
    nll, n = judge_nll(judge, prompts, completions)
    tri = [trigram.nll(p, c) for p, c in zip(prompts, completions)]
    entropy, distinct_bigrams = diversity(completions)
    texts = [tok.decode(c) for c in completions]
    full = [tok.decode(p + c).strip() for p, c in zip(prompts, completions)]
    return dict(n=len(completions), judge_ppl=math.exp(nll / n),
                trigram_ppl=math.exp(sum(t[0] for t in tri) / sum(t[1] for t in tri)),
                entropy=entropy, distinct_bigrams=distinct_bigrams,
                words=sum(len(t.split()) for t in texts) / len(texts),
                empty=sum(not t.strip() for t in texts) / len(texts),
                copied=sum(t in train_set for t in full) / len(full), examples=full[:8])


def diffusion_completions(model, tok, prompts, steps, seed=1, **sample):
    cfg = dlm.SampleConfig(num_steps=steps, **sample)
    texts = [tok.decode(p) for p in prompts]
    out = dlm.generate(model, tok, texts, seq_len=model.config.max_len, cfg=cfg, seed=seed, batch_size=250)
    return [s["token_ids"][len(p):] for p, s in zip(prompts, out)]


def causal_completions(model, prompts, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = [None] * len(prompts)
    for length in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == length]
        for lo in range(0, len(rows), 250):
            part = rows[lo: lo + 250]
            for i, ids in zip(part, model.generate([prompts[i] for i in part], MAX_LEN, g)):
                out[i] = ids
    return out


def prompt_set(tok, held_out, n, seed=0):
    """(prompt ids, the held-out line's own completion ids) for n held-out lines of six words or more."""
    rng = random.Random(seed)
    lines = rng.sample([line for line in held_out if len(line.split()) >= 2 * PROMPT_WORDS], n)
    prompts = [" ".join(line.split()[:PROMPT_WORDS]) for line in lines]
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    full = tok(lines, add_special_tokens=False)["input_ids"]
    return p_ids, [f[len(p):] if f[: len(p)] == p else tok(line[len(text):], add_special_tokens=False)["input_ids"]
                   for f, p, line, text in zip(full, p_ids, lines, prompts)]


# ---------------------------------------------------------------- the run

def parse_value(default, text):
    """A config override from the command line, as the type of its default."""
    if isinstance(default, bool) or default is None:  # None: a switch set by the model (SampleConfig.draw)
        return text.lower() in ("1", "true", "yes")
    return type(default)(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8, help="training budget of every row (default: 8)")
    p.add_argument("--judge_minutes", type=float, default=20, help="the judge's training, once (default: 20)")
    p.add_argument("--samples", type=int, default=500, help="samples per row (default: 500)")
    p.add_argument("--steps", default="10,20,50", help="sampling steps of the diffusion rows")
    p.add_argument("--reuse", action="store_true", help="keep the trained rows found in benchmarks/out/realtext")
    p.add_argument("--diffusion_args", default="--block_size 2 --fold_last --one_stream",
                   help="the diffusion rows' training flags (default: the README's real-text recipe; \"\": the whole "
                        "window, which samples best drawn at --sample temperature=0.9)")
    p.add_argument("--random_args", default="--train_embeddings",
                   help="added to --diffusion_args for the row from the random base (NOTES row 96: better from "
                        "random, no better adapting the stand-in)")
    p.add_argument("--sample", default="", help="SampleConfig overrides for the drawn rows, field=value,...")
    p.add_argument("--tag", default="", help="suffix of the diffusion rows' folders (experiments)")
    p.add_argument("--seed", type=int, default=1, help="sampling seed of every row (with --reuse: another sample set)")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("causal", help=argparse.SUPPRESS)  # a child process: train one causal LM
    c.add_argument("--out", required=True)
    c.add_argument("--minutes", type=float, required=True)
    c.add_argument("--init")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--judge", action="store_true")
    c.add_argument("--dataset", help="a text file to train on instead of the Shakespeare lines")
    c.add_argument("--learning_rate", type=float, default=RECIPE["learning_rate"])
    args = p.parse_args()
    if args.command == "causal":
        return train_causal(args.out, args.minutes, args.init, args.threads, args.judge, dataset=args.dataset,
                            learning_rate=args.learning_rate)

    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(2)
    dlm.keep_freed_memory()
    write_split()
    dlm.load_base_model("tiny")  # build the tiny base once, before the children race to
    out = lambda name: OUT / name
    have = lambda name: args.reuse and (out(name) / "config.json").exists()
    if not (out("judge") / "config.json").exists():
        print(f"training the judge for {args.judge_minutes} min (once) ...", file=sys.stderr)
        subprocess.run(causal_command(out("judge"), args.judge_minutes, threads=2, judge=True), check=True)
    extra, extra_random = args.diffusion_args.split(), args.random_args.split()
    d_random, d_adapted = f"diffusion_random{args.tag}", f"diffusion_adapted{args.tag}"
    rounds = [[(name, cmd) for name, cmd in pair if not have(name)] for pair in [
        [("causal_random", causal_command(out("causal_random"), args.minutes)),
         (d_random, train_diffusion(out(d_random), args.minutes, None, extra + extra_random))],
        [("causal_continued", causal_command(out("causal_continued"), args.minutes, init=out("causal_random"))),
         (d_adapted, train_diffusion(out(d_adapted), args.minutes, out("causal_random"), extra))]]]
    for pair in rounds:
        if pair:
            print(f"training {' and '.join(n for n, _ in pair)} for {args.minutes} min side by side ...", file=sys.stderr)
            side_by_side(*(cmd for _, cmd in pair))

    print("scoring ...", file=sys.stderr)
    tok = dlm.load_tokenizer("tiny")
    train, held_out = split_lines()
    judge = load_causal(out("judge"))
    train_ids = tok(train, add_special_tokens=False)["input_ids"]
    trigram = KneserNey(train_ids, len(judge.vocab_ids))
    train_set = set(train)
    rng = random.Random(0)
    n = args.samples
    reference = tok(rng.sample(held_out, n), add_special_tokens=False)["input_ids"]
    prompts, truth = prompt_set(tok, held_out, n)
    empty = [[] for _ in range(n)]
    sample = {k: parse_value(getattr(dlm.SampleConfig, k), v)
              for k, v in (kv.split("=") for kv in filter(None, args.sample.split(",")))}
    drawn = {**DRAWN, **sample}
    results = dict(minutes=args.minutes, samples=n, seed=args.seed, sample=drawn, diffusion_args=args.diffusion_args,
                   random_args=args.random_args,
                   steps={name: json.loads((out(name) / "steps.json").read_text())["steps"]
                          for name in ("causal_random", "causal_continued")})
    judged = lambda prompts, completions: score(tok, prompts, completions, judge, trigram, train_set)
    rows = results["rows"] = {"held-out lines": judged(empty, reference)}
    prompted = results["prompted"] = {"held-out lines": judged(prompts, truth)}
    steps = [int(k) for k in args.steps.split(",")]
    models = {}
    for kind, c_name, d_name in [("random base", "causal_random", d_random),
                                 ("pretrained stand-in", "causal_continued", d_adapted)]:
        causal = load_causal(out(c_name))
        rows[f"causal LM, {kind}"] = judged(empty, causal_completions(causal, empty, args.seed))
        prompted[f"causal LM, {kind}"] = judged(prompts, causal_completions(causal, prompts, args.seed))
        model = models[f"diffusion, {kind}"] = dlm.load(out(d_name))[0]
        results["steps"][d_name] = json.loads((out(d_name) / "trainer_state.json").read_text())["pos"]["step"]

        def diffusion(prompts, k, **kw):
            return judged(prompts, diffusion_completions(model, tok, prompts, k, args.seed, **kw))

        rows[f"diffusion, {kind}, 20 steps, rounded"] = diffusion(empty, 20, draw=False)
        for k in steps:
            rows[f"diffusion, {kind}, {k} steps, drawn"] = diffusion(empty, k, **drawn)
        prompted[f"diffusion, {kind}, 20 steps, drawn"] = diffusion(prompts, 20, **drawn)
    print("timing ...", file=sys.stderr)
    results["speed"] = speed(models, load_causal(out("causal_continued")), tok, train)
    (OUT / f"results{args.tag}.json").write_text(json.dumps(results, indent=1))
    print(report(results))


TRIMMED = "causal LM, trimmed to each batch's longest line"  # as it trains: the speed table's reference


def speed(models, causal, tok, train, rounds=30):
    """Training tokens per second of each diffusion model ({name: model}) and of the causal LM on the same
    64-line batches of the training text (mean of interleaved steps, so that all see the same machine):
    a diffusion model as it trains (a block model drops the blocks past every line's end), the causal
    LM trimmed to the longest line of each batch, as it trains, and once on the whole window. Tokens
    are counted on the whole window for all."""
    window = next(iter(models.values())).config
    data = dlm.TextData(train, tok, window.max_len, window.end_id)
    data.scan()
    batches = [batch.ids for batch in islice(data.batches(RECIPE["batch_size"], 0, 0), rounds)]
    g = torch.Generator().manual_seed(0)
    runs = {TRIMMED: (causal, causal.loss),
            "causal LM, the whole window": (causal, lambda ids: causal.loss(ids, trim=False)),
            **{name: (model, lambda ids, model=model: dlm.diffusion_loss(model, ids, g)) for name, model in models.items()}}
    steps, times = {}, {name: 0.0 for name in runs}
    for name, (net, loss_fn) in runs.items():
        net.train()
        opt = dlm.adamw(net, lr=1e-6)

        def step(ids, opt=opt, loss_fn=loss_fn):
            opt.zero_grad()
            loss_fn(ids).backward()
            opt.step()

        step(batches[0])
        steps[name] = step
    for ids in batches:
        for name, step in steps.items():
            start = time.perf_counter()
            step(ids)
            times[name] += time.perf_counter() - start
    tokens = sum(ids.numel() for ids in batches)
    return {name: tokens / seconds for name, seconds in times.items()}


def report(r):
    head = ("| judge perplexity | trigram perplexity | unigram entropy | distinct bigrams | words | empty | copied |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |")
    line = lambda name, s: (f"| {name} | {s['judge_ppl']:.0f} | {s['trigram_ppl']:.0f} | {s['entropy']:.2f} | "
                            f"{s['distinct_bigrams']:.2f} | {s['words']:.1f} | {100 * s['empty']:.1f}% | "
                            f"{100 * s['copied']:.1f}% |")
    steps = ", ".join(f"{k} {v}" for k, v in r["steps"].items())
    drawn = ", ".join(f"{k} {v}" for k, v in r["sample"].items())
    lines = [f"Training budget {r['minutes']} min per row; optimiser steps: {steps}. Drawn rows: {drawn}. "
             f"Sampling seed {r.get('seed', 1)}.", "",
             f"| {r['samples']} unconditional samples " + head]
    lines += [line(name, s) for name, s in r["rows"].items()]
    lines += ["", f"| {r['samples']} prompted completions (first {PROMPT_WORDS} words of held-out lines) " + head]
    lines += [line(name, s) for name, s in r["prompted"].items()]
    if "speed" in r:
        v = r["speed"]
        trimmed = v[TRIMMED]
        lines += ["", "| training on the same batches | tokens per second | a step's cost against the causal LM's |",
                  "| --- | --- | --- |"]
        lines += [f"| {name} | {rate:.0f} | {trimmed / rate:.2f}x |" for name, rate in v.items()]
    for name, s in list(r["rows"].items()) + list(r["prompted"].items()):
        if not name.startswith("held-out"):
            lines += ["", f"{name}:"] + [f"  {t}" for t in s["examples"][:4]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
