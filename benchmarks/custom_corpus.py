"""A second checkable corpus, for exercising train_with_custom_dataset.py on a file of your own.

Sentences like "Anna has three red apples." / "Tom sees one old dog.": the noun must agree with
the numeral ("one apple", "three apples").

    python benchmarks/custom_corpus.py write data.txt            # 10,000 lines
    python train_with_custom_dataset.py --dataset data.txt --base_model tiny ...
    python dlm_test.py --num_samples 200 --num_steps 20 --output s.jsonl
    python benchmarks/custom_corpus.py check s.jsonl              # % well-formed
"""

import json
import random
import sys

NAMES = ["Anna", "Tom", "Maria", "Ben", "Lena", "Omar", "Sara", "Paul"]
VERBS = ["has", "sees", "wants", "finds", "draws", "likes"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven"]
ADJECTIVES = ["red", "old", "small", "green", "new"]
NOUNS = {"apple": "apples", "dog": "dogs", "book": "books", "cup": "cups", "box": "boxes", "key": "keys"}


def sentence(rng):
    number, noun = rng.choice(NUMBERS), rng.choice(list(NOUNS))
    words = [rng.choice(NAMES), rng.choice(VERBS), number]
    words += [rng.choice(ADJECTIVES)] if rng.random() < 0.4 else []
    return " ".join(words + [noun if number == "one" else NOUNS[noun]]) + "."


def well_formed(text):
    if not text.endswith("."):
        return False
    w = text[:-1].split(" ")
    if len(w) not in (4, 5) or w[0] not in NAMES or w[1] not in VERBS or w[2] not in NUMBERS:
        return False
    if len(w) == 5 and w[3] not in ADJECTIVES:
        return False
    return w[-1] == next((s if w[2] == "one" else p for s, p in NOUNS.items() if w[-1] in (s, p)), None)


def main():
    command, path = sys.argv[1], sys.argv[2]
    if command == "write":
        rng = random.Random(0)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(sentence(rng) + "\n" for _ in range(10000))
    else:
        texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
        print(f"{sum(map(well_formed, texts))} of {len(texts)} well-formed "
              f"({100 * sum(map(well_formed, texts)) / len(texts):.1f}%), {len(set(texts))} distinct")


if __name__ == "__main__":
    main()
