"""Recipe sweep: train variants of the recipe for the same number of optimiser steps, in parallel,
and score each one. Meant for a lent GPU, where a CPU-minute of training takes seconds. The
recipe is the benchmark's (bench.RECIPE: batch 64, learning rate 2e-3, a 16-token window) in
float32, as on the CPU, for 5,200 steps, about what 8 minutes on the 2-core CPU give
(benchmarks/NOTES.md, rows 32 and 35; row 30 ran 3,317 steps at max_len:32, dtype:bfloat16,
learning_rate:1e-3).

    python benchmarks/sweep.py now old=prompt_prob:0.5,self_cond_prob:0.5 lr=learning_rate:1e-3
    python benchmarks/sweep.py --steps 50 --device cpu now                             # a smoke run

A variant is NAME (the current recipe) or NAME=field:value,...; fields are DLMConfig's or
TrainConfig's (seed, learning_rate, warmup_steps, ...). Prints a markdown table and writes
benchmarks/out/sweep.json (and $OUT/sweep.json when $OUT is set); each variant's log goes to
benchmarks/out/sweep/NAME.log. Well-formed %, distinct %: 400 unconditional samples at 10, 20
and 200 steps, 200 agreement prompts at 20 steps and guidance 1 and 5.
"""

import argparse
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dlm_common as dlm  # noqa: E402
from bench import RECIPE, diffusion_texts, score  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "sweep"


def parse_variant(text):
    name, _, spec = text.partition("=")
    values = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split(":")
        config = next((c for c in (dlm.DLMConfig, dlm.TrainConfig) if key in dlm.own_fields(c)), None)
        if config is None:
            sys.exit(f"{text}: {key} is not a field of DLMConfig or TrainConfig")
        values[key] = type(getattr(config, key))(value)
    return name, values


class FixedSteps:
    """A TextData whose epochs add up to exactly `steps` batches, so every variant gets the same
    number of optimiser steps and the same learning-rate schedule."""

    def __init__(self, data, batch_size, steps):
        self.data, self.steps = data, steps
        self.epochs = -(-steps // data.batches_per_epoch(batch_size))

    def batches_per_epoch(self, batch_size, world=1):
        return self.steps / self.epochs

    def batches(self, batch_size, epoch, seed, rank=0, world=1):
        per_epoch = self.data.batches_per_epoch(batch_size)
        left = self.steps - epoch * per_epoch
        return islice(self.data.batches(batch_size, epoch, seed), max(0, min(per_epoch, left)))


def well_formed(model, tok, prompts, steps, **kw):
    """(% well-formed, % distinct) of one sample per prompt, scored like benchmarks/bench.py."""
    s = score(diffusion_texts(model, tok, prompts, steps, **kw), train_set=set())
    return round(100 * s["well_formed"], 1), round(100 * s["distinct"], 1)


def run_one(name, values, steps, device):
    torch.set_num_threads(1)
    recipe = {**RECIPE, "base_model": "tiny", "log_every": 200, "dtype": "float32", **values}
    train, config = dlm.from_flags(dlm.TrainConfig, recipe), dlm.from_flags(dlm.DLMConfig, recipe)
    torch.manual_seed(train.seed)
    tok = dlm.load_tokenizer("tiny")
    data = dlm.TextData(dlm.builtin_corpus(), tok, config.max_len, dlm.end_of_text_id(tok))
    token_ids, _ = data.scan()
    model = dlm.build_model(config, dlm.load_base_model("tiny"), tok, token_ids).to(device)
    fixed = FixedSteps(data, train.batch_size, steps)
    train.num_epochs = fixed.epochs
    log = dlm.train(model, fixed, train)
    unconditional, prompts = [""] * 400, dlm.agreement_prompts(200)
    result = dict(name=name, values=values, steps=log[-1]["step"], loss=log[-1]["loss"],
                  u10=well_formed(model, tok, unconditional, 10), u20=well_formed(model, tok, unconditional, 20),
                  u200=well_formed(model, tok, unconditional, 200),
                  p20_g1=well_formed(model, tok, prompts, 20, guidance=1.0),
                  p20_g5=well_formed(model, tok, prompts, 20))
    (OUT / f"{name}.json").write_text(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="NAME or NAME=field:value,...")
    p.add_argument("--steps", type=int, default=5200, help="optimiser steps per variant (default: %(default)s)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: run one variant
    args = p.parse_args()
    if args.one:
        return run_one(*parse_variant(args.variants[0]), args.steps, args.device)
    names = [parse_variant(v)[0] for v in args.variants]  # check them all before starting any
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        (OUT / f"{name}.json").unlink(missing_ok=True)
    dlm.load_base_model("tiny")  # build the tiny base once, before the children race to
    children = [subprocess.Popen([sys.executable, __file__, "--one", "--steps", str(args.steps), "--device", args.device,
                                  v], stdout=subprocess.DEVNULL, stderr=open(OUT / f"{name}.log", "w"))
                for name, v in zip(names, args.variants)]
    for child in children:
        child.wait()
    rows = []
    for name in names:
        if (OUT / f"{name}.json").exists():
            rows.append(json.loads((OUT / f"{name}.json").read_text()))
        else:
            print(f"{name} failed; see {OUT / name}.log", file=sys.stderr)
    keys = ["steps", "loss", "u10", "u20", "u200", "p20_g1", "p20_g5"]
    print("| variant | " + " | ".join(keys) + " |\n|" + " --- |" * (len(keys) + 1))
    for r in rows:
        print(f"| {r['name']} {r['values'] or ''} | " + " | ".join(str(r[k]) for k in keys) + " |")
    for path in filter(None, [OUT.parent / "sweep.json", os.environ.get("OUT") and Path(os.environ["OUT"]) / "sweep.json"]):
        path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
