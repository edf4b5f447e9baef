"""Prompt/completion rows: does the model learn to answer from the prompt? Exact-match accuracy
on held-out questions.

    python benchmarks/qa.py              # about 3 minutes on a 2-core CPU

Each row is {"prompt": "Anna has a dog. What does Anna have?", "completion": " A dog."}. The
held-out questions pair names and animals never paired in training, so the answer has to be read
from the prompt. The tiny base is trained on the rows through train_with_custom_dataset.py (a JSONL
file, as a user would), then every held-out prompt is completed with generate_with_prompt.py's
settings, and the completion is compared with the answer. Chance is 1 in len(ANIMALS).
"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dlm_common as dlm  # noqa: E402

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
         "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Victor"]
ANIMALS = ["dog", "cat", "bird", "horse", "fish", "goat", "sheep", "rabbit", "mouse", "duck"]


# the recipe tests/test_data.py trains with too: a 100-step discretisation samples quickly. At 2e-3
# the run is at the edge of stable: a change in the last bits of the gradients took seed 0 from 98%
# to 18% at 600 steps (NOTES row 90); 1e-3 got 97.5-100% on four seeds at 1,000 steps.
RECIPE = ["--base_model", "tiny", "--batch_size", "16", "--learning_rate", "1e-3", "--num_steps", "100"]


def qa_rows(held_out_share=0.2, seed=0):
    """(training rows, held-out rows): every name with every animal, split at random by pair."""
    pairs = [(name, animal) for name in NAMES for animal in ANIMALS]
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": f"{name} has a {animal}. What does {name} have?", "completion": f" A {animal}."}
            for name, animal in pairs]
    k = int(len(rows) * held_out_share)
    return rows[k:], rows[:k]


def accuracy(model, tokenizer, rows, seed=0):
    """Share of rows whose completion, stripped, is exactly the answer."""
    samples = dlm.generate(model, tokenizer, [r["prompt"] for r in rows], seq_len=model.config.max_len, seed=seed)
    return sum(s["completion"].strip() == r["completion"].strip() for s, r in zip(samples, rows)) / len(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", default="20,60,100", help="training lengths to compare, in epochs of 10 steps")
    p.add_argument("--dir", default=str(ROOT / "benchmarks" / "out" / "qa"))
    args = p.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = qa_rows()
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    print(f"{len(train)} training rows, {len(held_out)} held-out questions; chance {1 / len(ANIMALS):.0%}\n")
    print("| epochs | steps | training time | held-out exact match | on training prompts |\n| --- | --- | --- | --- | --- |")
    for epochs in map(int, args.epochs.split(",")):
        out = work / f"model-{epochs}"
        start = time.time()
        subprocess.run([sys.executable, str(ROOT / "train_with_custom_dataset.py"), "--dataset", str(work / "train.jsonl"),
                        *RECIPE, "--num_epochs", str(epochs),
                        "--output_dir", str(out), "--overwrite"], check=True, stderr=subprocess.DEVNULL)
        seconds = time.time() - start
        model, tokenizer = dlm.load(out)
        steps = json.loads((out / "trainer_state.json").read_text())["pos"]["step"]
        print(f"| {epochs} | {steps} | {seconds:.0f} s | {accuracy(model, tokenizer, held_out):.0%} | "
              f"{accuracy(model, tokenizer, train[:len(held_out)]):.0%} |", flush=True)


if __name__ == "__main__":
    main()
