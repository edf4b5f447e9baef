"""The GPU check (run by gpu_check.sh): a randomly initialised model with Qwen2.5-0.5B's exact
configuration, trained a few hundred steps in bf16 through dlm_train.py, then sampled.

Reports training tokens/s and model FLOPs utilisation, and the latency of one 32-token sample
at 20 steps against autoregressive decoding (KV cache) of the same Qwen body.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dlm_common as dlm  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/dlm-gpu-check")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=256)
    args = p.parse_args()
    work = Path(args.work)
    base, model_dir = work / "qwen2.5-0.5b-random", work / "model"
    if not base.exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "random_base.py"), "--out", str(base)], check=True)
    # enough examples for args.steps steps in one epoch
    n = args.steps * args.batch_size
    start = time.time()
    subprocess.run([sys.executable, str(ROOT / "dlm_train.py"), "--base_model", str(base), "--num_examples", str(n),
                    "--num_epochs", "1", "--batch_size", str(args.batch_size), "--learning_rate", "1e-4",
                    "--dtype", "bfloat16", "--output_dir", str(model_dir), "--overwrite"], check=True)
    wall = time.time() - start
    log = [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
    # steady state: from the first logged record to the last
    (s0, t0), (s1, t1) = (log[0]["step"], log[0]["seconds"]), (log[-1]["step"], log[-1]["seconds"])
    model, tok = dlm.load(model_dir, "cuda")
    tokens_per_s = (s1 - s0) * args.batch_size * model.config.max_len / (t1 - t0)
    body = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    # 6 FLOPs per parameter per token for forward + backward, plus the extra forward (2) that
    # self-conditioning runs on a share (self_cond_prob) of the batches
    flops_per_token = (6 + 2 * model.config.self_cond_prob) * body
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    result = dict(gpu=gpu, train_wall_s=wall, tokens_per_s=tokens_per_s,
                  mfu=flops_per_token * tokens_per_s / peak if peak else None,
                  peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9)

    def timed(fn, repeats=10):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    cfg = dlm.SampleConfig(num_steps=20)
    bf16 = torch.bfloat16
    samples = lambda n: dlm.generate(model, tok, [""], num_samples=n, seq_len=32, cfg=cfg, dtype=bf16)
    result["diffusion_20_steps_latency_s"] = timed(lambda: samples(1))
    causal = dlm.load_base_model(str(base), dtype=bf16).cuda().eval()
    start_ids = torch.tensor([[model.config.end_id]], device="cuda")
    result["ar_32_tokens_latency_s"] = timed(lambda: causal.generate(
        start_ids, max_new_tokens=32, min_new_tokens=32, do_sample=True, pad_token_id=model.config.end_id))
    result["diffusion_samples_per_s_b64"] = 64 / timed(lambda: samples(64), 3)
    print(json.dumps(result, indent=2))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
