"""Quality and speed of the diffusion LM against an autoregressive Qwen of the same size.

    python benchmarks/bench.py               # the full run: about 27 minutes on a 2-core CPU
    python benchmarks/bench.py --minutes 1 --curve "" --samples 50 --sweep_samples 20    # a smoke run

Both models are the built-in `tiny` Qwen2 (4 layers, hidden 128) on the built-in grammar
corpus, trained for the same wall-clock budget: the diffusion model through dlm_train.py (the
quick start's flags: a 16-token window, as the longest sentence is 15 tokens), the autoregressive
one as an ordinary causal LM (its own learning rate, padding trimmed per batch, KV-cache
decoding). Both read Qwen's frozen input embeddings and predict over the same restricted
vocabulary, so neither pays for a 151,936-way softmax. Prints markdown tables and writes benchmarks/out/results.json.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dlm_common as dlm  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
# the README quick start's flags; the built-in sentences are at most 15 tokens, so a 16-token
# window holds every one of them (the causal LM, likewise, trims each batch's padding)
RECIPE = dict(batch_size=64, learning_rate=2e-3, max_len=16)
# the causal LM's own: it is at 100% well-formed within 30 seconds at this rate (NOTES.md)
AR_LEARNING_RATE = 1e-3


# ---------------------------------------------------------------- the two models

def train_diffusion(minutes, name, extra=()):
    """Train through the project's own CLI; returns the model folder."""
    out = OUT / name
    cmd = [sys.executable, str(ROOT / "dlm_train.py"), "--base_model", "tiny",
           *(f"--{k}={v}" for k, v in RECIPE.items()), "--max_minutes", str(minutes),
           "--num_epochs", "1000", "--output_dir", str(out), "--overwrite", *extra]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return out


class CausalLM(nn.Module):
    """The same Qwen2 body as an ordinary left-to-right LM, with a head over the same vocabulary."""

    def __init__(self, base, vocab_ids, end_id):
        super().__init__()
        self.body, self.end_id = base.model, end_id
        self.body.get_input_embeddings().weight.requires_grad_(False)
        self.register_buffer("vocab_ids", vocab_ids)
        self.head = nn.Linear(base.config.hidden_size, len(vocab_ids), bias=False)
        self.head.weight.data.copy_(base.get_output_embeddings().weight[vocab_ids].detach())

    def hidden(self, ids, cache=None):
        return self.body(inputs_embeds=self.body.get_input_embeddings()(ids), past_key_values=cache,
                         use_cache=cache is not None).last_hidden_state

    @property
    def head_weight(self):
        return self.head.weight

    def forward(self, ids, cache=None):
        return self.hidden(ids, cache) @ self.head_weight.T

    def loss(self, ids, trim=True):
        """Next-token cross-entropy; <|endoftext|> starts every text. With `trim`, padding past the
        longest text in the batch is dropped, as any causal-LM trainer would. Computed as the diffusion
        model's is (dlm.linear_cross_entropy), so that neither holds all its logits."""
        if trim:
            ids = ids[:, : int((ids != self.end_id).sum(1).max()) + 1]
        ids = torch.cat([torch.full((len(ids), 1), self.end_id), ids], 1)
        targets = torch.searchsorted(self.vocab_ids, ids[:, 1:].contiguous()).flatten()
        return dlm.linear_cross_entropy(self.hidden(ids[:, :-1]).flatten(0, 1), self.head_weight, targets)

    @torch.no_grad()
    def generate(self, prompts, max_new, generator, stop=True):
        """Sample continuations (temperature 1) of equal-length prompt id lists, with a KV cache."""
        from transformers import DynamicCache

        self.eval()
        ids = torch.tensor([[self.end_id] + p for p in prompts])
        cache, out = DynamicCache(config=self.body.config), []
        done = torch.zeros(len(ids), dtype=torch.bool)
        for _ in range(max_new):
            logits = self(ids, cache)[:, -1]
            nxt = self.vocab_ids[torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]]
            nxt = torch.where(done, self.end_id, nxt)
            done |= nxt == self.end_id
            out.append(nxt)
            ids = nxt[:, None]
            if stop and done.all():
                break
        return torch.stack(out, 1)


def train_ar(minutes, data, vocab_ids, end_id, seed=0):
    """The causal LM, trained like the diffusion model: same batches, optimiser and schedule (its own
    learning rate)."""
    torch.manual_seed(seed)
    model = CausalLM(dlm.load_base_model("tiny"), vocab_ids, end_id)
    cfg = dlm.TrainConfig(batch_size=RECIPE["batch_size"], learning_rate=AR_LEARNING_RATE, max_minutes=minutes)
    return model, fit(model, data, cfg, seed)


def fit(model, data, cfg, seed=0):
    """Train a causal LM for cfg.max_minutes of wall-clock time with the diffusion trainer's optimiser
    and learning-rate schedule; returns the optimiser steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = dlm.adamw(model, lr=cfg.learning_rate, betas=(0.9, 0.99))
    start, step, epoch, budget = time.time(), 0, 0, 60 * cfg.max_minutes
    model.train()
    while time.time() - start < budget:
        for ids in (batch.ids for batch in data.batches(cfg.batch_size, epoch, seed)):
            elapsed = time.time() - start
            if elapsed >= budget:
                break
            for g in opt.param_groups:
                g["lr"] = dlm.lr_at(cfg, step, elapsed / budget)
            loss = model.loss(ids)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
        epoch += 1
    return step


# ---------------------------------------------------------------- measurements

def score(texts, train_set):
    n = len(texts)
    return dict(well_formed=sum(map(dlm.is_well_formed, texts)) / n, distinct=len(set(texts)) / n,
                novel=sum(t not in train_set for t in texts) / n, n=n)


def diffusion_texts(model, tok, prompts, steps, seed=1, guidance=dlm.SampleConfig.guidance_scale, seq_len=32):
    cfg = dlm.SampleConfig(num_steps=steps, guidance_scale=guidance)
    out = dlm.generate(model, tok, prompts, seq_len=seq_len, cfg=cfg, seed=seed, batch_size=200)
    return [s["text"] for s in out]


def ar_texts(ar, tok, prompts, seed=1):
    """Continuations grouped by prompt length (so each group is one batch)."""
    g = torch.Generator().manual_seed(seed)
    encoded = tok(prompts, add_special_tokens=False)["input_ids"] if any(prompts) else [[] for _ in prompts]
    texts = [None] * len(prompts)
    for length in sorted({len(e) for e in encoded}):
        rows = [i for i, e in enumerate(encoded) if len(e) == length]
        out = ar.generate([encoded[i] for i in rows], 32 - length, g)
        for i, ids in zip(rows, out):
            texts[i] = prompts[i] + dlm.decode(tok, ids, ar.end_id)
    return texts


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values):
    return sorted(values)[len(values) // 2]


def median_time(fn, repeats=5):
    return median([seconds(fn) for _ in range(repeats)])


def speed(trained, tok, ar, data):
    """Latency, throughput, training step time and the nearest-neighbour share, same machine.

    Speed depends on the architecture and the window, not on the weights, so the diffusion side is
    timed at 32 tokens (the trained weights in a 32-token window), like the causal LM, and once
    more at the trained model's own window."""
    g = torch.Generator().manual_seed(0)
    cfg = lambda k: dlm.SampleConfig(num_steps=k)
    model = copy.deepcopy(trained)
    model.config.max_len, window = 32, trained.config.max_len
    result = {"window": window}
    # batch-1 latency: measured in turn, 9 rounds (a new seed each), medians (the machine's speed drifts)
    one = lambda m, steps, seed: dlm.generate(m, tok, [""], seq_len=32, cfg=cfg(steps), seed=seed)
    latency = {"diffusion_latency_10_steps_s": lambda seed: one(model, 10, seed),
               "diffusion_latency_20_steps_s": lambda seed: one(model, 20, seed),
               "ar_latency_32_tokens_s": lambda seed: ar.generate([[]], 32, g, stop=False),
               "diffusion_latency_20_steps_window_s": lambda seed: one(trained, 20, seed),
               "ar_latency_window_tokens_s": lambda seed: ar.generate([[]], window, g, stop=False)}
    times = {name: [] for name in latency}
    for seed in range(9):
        for name, fn in latency.items():
            times[name].append(seconds(lambda: fn(seed)))
    result.update({name: median(v) for name, v in times.items()})
    # sampling stops once every position is decided: how many of its 20 steps a 32-token sample runs
    runs = []
    for seed in range(9):
        recorder = dlm.StepRecorder()
        dlm.generate(model, tok, [""], num_samples=1, seq_len=32, cfg=cfg(20), seed=seed, callback=recorder)
        runs.append(len(recorder.frames))
    result["diffusion_steps_run_of_20"] = sum(runs) / len(runs)
    result["diffusion_samples_per_s_b64_20_steps"] = 64 / median_time(
        lambda: dlm.generate(model, tok, [""], num_samples=64, seq_len=32, cfg=cfg(20)), 3)
    result["ar_samples_per_s_b64_32_tokens"] = 64 / median_time(lambda: ar.generate([[]] * 64, 32, g, stop=False), 3)
    # training: optimiser steps on the same 64 x 32 tokens (the causal LM untrimmed: same tokens),
    # the two models' steps interleaved so both see the same machine; a mean, not a median, so the
    # self-conditioned steps (a share of them, each running the model twice) count at their share
    ids = next(data.batches(64, 0, 0))[1]
    steps, times = {}, {}
    for name, net, loss_fn in [("diffusion", model, lambda: dlm.diffusion_loss(model, ids, g)),
                               ("ar", ar, lambda: ar.loss(ids, trim=False))]:
        net.train()
        opt = dlm.adamw(net, lr=1e-6)

        def step(opt=opt, loss_fn=loss_fn):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()

        step()
        steps[name], times[name] = step, 0.0
    for _ in range(40):
        for name, step in steps.items():
            times[name] += seconds(step)
    for name, total in times.items():
        result[f"{name}_train_tokens_per_s"] = 40 * ids.numel() / total
    model.eval()
    # nearest-neighbour rounding (each position when it is decided), timed inside a 20-step batch-64 sample
    spent, rounding = [], dlm.nearest_neighbour

    def timed(*args):
        start = time.perf_counter()
        idx = rounding(*args)
        spent.append(time.perf_counter() - start)
        return idx

    dlm.nearest_neighbour = timed
    try:
        total = seconds(lambda: dlm.generate(model, tok, [""], num_samples=64, seq_len=32, cfg=cfg(20)))
    finally:
        dlm.nearest_neighbour = rounding
    result["nearest_neighbour_share"] = sum(spent) / total
    return result


# ---------------------------------------------------------------- the run

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8, help="training budget of each model (default: 8)")
    p.add_argument("--curve", default="2,4", help="extra, shorter diffusion budgets for the training curve")
    # 200 samples cannot tell 99.5% from 100% (either way is one sample), so the rows the targets
    # compare get ten times as many
    p.add_argument("--samples", type=int, default=2000,
                   help="samples for the rows the two models are compared on (default: 2000)")
    p.add_argument("--sweep_samples", type=int, default=200,
                   help="samples per point of the sweeps over steps, guidance and budget (default: 200)")
    p.add_argument("--steps", default="5,10,20,50,100,200", help="sampling steps to sweep")
    p.add_argument("--guidance", default="0,1,2,5,10", help="guidance scales to sweep on prompts")
    args = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the tables
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    n, m, results = args.samples, args.sweep_samples, {"minutes": args.minutes}
    train_texts = dlm.builtin_corpus()
    train_set = set(train_texts)
    prompts, sweep_prompts = dlm.agreement_prompts(n), dlm.agreement_prompts(m)

    print(f"training the diffusion model for {args.minutes} min ...", file=sys.stderr)
    model, tok = dlm.load(train_diffusion(args.minutes, "diffusion"))
    results["diffusion_steps"] = json.loads((OUT / "diffusion" / "trainer_state.json").read_text())["pos"]["step"]
    print(f"training the causal LM for {args.minutes} min ...", file=sys.stderr)
    data = dlm.TextData(train_texts, tok, 32, model.config.end_id)
    data.scan()
    ar, results["ar_steps"] = train_ar(args.minutes, data, model.vocab_ids, model.config.end_id)

    print("sampling ...", file=sys.stderr)
    results["ar"] = score(ar_texts(ar, tok, [""] * n), train_set)
    results["ar_prompted"] = score(ar_texts(ar, tok, prompts), train_set)
    results["diffusion"] = score(diffusion_texts(model, tok, [""] * n, 20), train_set)
    results["diffusion_prompted"] = score(diffusion_texts(model, tok, prompts, 20), train_set)
    results["diffusion_by_steps"] = {k: score(diffusion_texts(model, tok, [""] * m, int(k)), train_set)
                                     for k in args.steps.split(",")}
    results["diffusion_prompted_by_guidance"] = {s: score(diffusion_texts(model, tok, sweep_prompts, 20,
                                                                          guidance=float(s)), train_set)
                                                 for s in args.guidance.split(",")}
    examples = diffusion_texts(model, tok, [""] * 10, 20)
    results["examples"] = dict(diffusion=examples, ar=ar_texts(ar, tok, [""] * 10))
    curve = {}
    for minutes in filter(None, args.curve.split(",")):
        print(f"training the diffusion model for {minutes} min ...", file=sys.stderr)
        short, _ = dlm.load(train_diffusion(float(minutes), f"diffusion-{minutes}min"))
        curve[minutes] = score(diffusion_texts(short, tok, [""] * m, 20), train_set)
    curve[str(args.minutes)] = results["diffusion_by_steps"].get("20")
    results["diffusion_by_budget_20_steps"] = curve
    print("timing ...", file=sys.stderr)
    results["speed"] = speed(model, tok, ar, data)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))


def report(r):
    pct = lambda x, digits=1: f"{100 * x:.{digits}f}%"
    row = lambda name, s, digits=1: (f"| {name} | {pct(s['well_formed'], digits)} | {pct(s['distinct'], digits)} | "
                                     f"{pct(s['novel'], digits)} |")
    d20 = r["diffusion_by_steps"].get("20")
    lines = [f"Training budget {r['minutes']} min each (diffusion {r['diffusion_steps']} steps, "
             f"causal LM {r['ar_steps']} steps).", "",
             f"| {r['ar']['n']} samples per row | well-formed | distinct | novel |", "| --- | --- | --- | --- |",
             row("autoregressive, unconditional", r["ar"], 2),
             row("diffusion, unconditional, 20 steps", r["diffusion"], 2),
             row("autoregressive, agreement prompts", r["ar_prompted"], 2),
             row(f"diffusion, agreement prompts, 20 steps, guidance {dlm.SampleConfig.guidance_scale:g}",
                 r["diffusion_prompted"], 2),
             "", f"| diffusion, {d20['n'] if d20 else '?'} samples per row | well-formed | distinct | novel |",
             "| --- | --- | --- | --- |"]
    lines += [row(f"unconditional, {k} steps", s) for k, s in r["diffusion_by_steps"].items()]
    lines += [row(f"agreement prompts, 20 steps, guidance {g}", s)
              for g, s in r["diffusion_prompted_by_guidance"].items()]
    lines += ["", "| diffusion training budget (min) | well-formed at 20 steps |", "| --- | --- |"]
    lines += [f"| {m} | {pct(s['well_formed'])} |" for m, s in r["diffusion_by_budget_20_steps"].items() if s]
    s = r["speed"]
    lines += ["", "| speed (same machine, same run) | diffusion | autoregressive |", "| --- | --- | --- |",
              f"| one 32-token sample, batch 1 | {1000 * s['diffusion_latency_10_steps_s']:.0f} ms (10 steps), "
              f"{1000 * s['diffusion_latency_20_steps_s']:.0f} ms (20 steps) | {1000 * s['ar_latency_32_tokens_s']:.0f} ms |",
              f"| one {s['window']}-token sample (the trained window), batch 1 | "
              f"{1000 * s['diffusion_latency_20_steps_window_s']:.0f} ms (20 steps) | "
              f"{1000 * s['ar_latency_window_tokens_s']:.0f} ms |",
              f"| steps a 20-step 32-token sample runs (it stops once every position is decided) | "
              f"{s['diffusion_steps_run_of_20']:.1f} | |",
              f"| samples per second, batch 64 | {s['diffusion_samples_per_s_b64_20_steps']:.0f} (20 steps) | "
              f"{s['ar_samples_per_s_b64_32_tokens']:.0f} |",
              f"| training tokens per second | {s['diffusion_train_tokens_per_s']:.0f} | {s['ar_train_tokens_per_s']:.0f} |",
              f"| nearest-neighbour share of sampling time | {pct(s['nearest_neighbour_share'])} | |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
