"""Sampling with the weights in bfloat16 (`--dtype bfloat16`) against float32, on the CPU: memory,
time, and the grammar benchmark's quality.

    python benchmarks/half_precision.py --model_dir projects/diffusion_model 2>/dev/null   # a grammar model; 1 minute

Both runs sample the same unconditional rows and agreement prompts with the same seed (20 steps,
the default sampler), scored like benchmarks/bench.py: % well-formed and % distinct; and the share
of token positions where the two precisions chose the same id.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import dlm_common as dlm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=str(dlm.DEFAULT_MODEL_DIR))
    p.add_argument("--samples", type=int, default=2000)
    args = p.parse_args()
    rows = {"unconditional": [""] * args.samples, "agreement prompts": dlm.agreement_prompts(args.samples)}
    cfg = dlm.SampleConfig(num_steps=20)
    print("| weights | parameter memory | rows | well-formed | distinct | seconds | ids as float32 |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    reference = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = dlm.load(args.model_dir, dtype=dtype)
        memory = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
        for name, prompts in rows.items():
            start = time.time()
            samples = dlm.generate(model, tok, prompts, seq_len=32, cfg=cfg, seed=1, batch_size=200)
            seconds = time.time() - start
            ids = [s["token_ids"] for s in samples]
            reference.setdefault(name, ids)
            same = sum(x == y for a, b in zip(reference[name], ids) for x, y in zip(a, b))
            positions = sum(max(len(a), len(b)) for a, b in zip(reference[name], ids))
            texts = [s["text"] for s in samples]
            print(f"| {str(dtype)[6:]} | {memory:.0f} MB | {name} | {100 * sum(map(dlm.is_well_formed, texts)) / len(texts):.2f}% "
                  f"| {100 * len(set(texts)) / len(texts):.2f}% | {seconds:.1f} | {100 * same / positions:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
