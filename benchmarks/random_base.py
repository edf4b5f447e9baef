"""Write a randomly initialised Qwen with a real model's exact configuration, plus the Qwen
tokenizer, with save_pretrained: the size users start from, without downloading weights.

    python benchmarks/random_base.py --config qwen2.5-0.5b --out /tmp/qwen2.5-0.5b-random
    python dlm_train.py --base_model /tmp/qwen2.5-0.5b-random ...
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dlm_common as dlm  # noqa: E402

# From the models' config.json on the Hugging Face Hub.
CONFIGS = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_window_layers=24),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, max_window_layers=36),
}
COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu", bos_token_id=151643,
              eos_token_id=151643)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="qwen2.5-0.5b")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIGS[args.config], **COMMON))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out)
    dlm.build_qwen_tokenizer().save_pretrained(args.out)
    print(f"{args.config}: {n / 1e6:.0f}M parameters, written to {args.out}")


if __name__ == "__main__":
    main()
