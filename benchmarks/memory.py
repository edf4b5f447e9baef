"""Speed of the first pass, and peak memory of train_with_custom_dataset.py, on a 10 MB and on a
1 GB text file.

    python benchmarks/memory.py            # about 6 minutes on a 2-core CPU

The first pass (the diffusion vocabulary, the number of examples, the longest one) runs alone in
a child process and is timed, start-up left out: MB/s. Then the trainer runs on the file: it
repeats that pass and trains the tiny base for a fixed time (--minutes). Both stream the file,
so memory should not grow with it; peak resident memory is read from the kernel (ru_maxrss of
each child).
"""

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dlm_common as dlm  # noqa: E402


def write_corpus(path, size_bytes, seed=0):
    """Grammar sentences, one per line, until the file reaches size_bytes."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < size_bytes:
            chunk = "".join(dlm.grammar_sentence(rng) + "\n" for _ in range(10000))
            f.write(chunk)
            written += len(chunk)


def peak_rss_mb(cmd):
    """Run cmd as a child; return (its own peak resident memory in MB, seconds)."""
    start = time.time()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's rusage alone, not the max over all children
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    return usage.ru_maxrss / 1024, time.time() - start


def first_pass(path, report):
    """The trainer's first pass over a file, alone (the child process's job); its seconds, without
    the start-up, go to the file `report`."""
    tok = dlm.load_tokenizer("tiny")
    start = time.time()
    dlm.TextData(path, tok, dlm.AUTO_MAX_LEN, dlm.end_of_text_id(tok)).scan()
    Path(report).write_text(str(time.time() - start))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first_pass", nargs=2, help=argparse.SUPPRESS)  # the child process's job: FILE REPORT
    p.add_argument("--sizes_mb", default="10,1000")
    p.add_argument("--minutes", type=float, default=0.5, help="training time after the vocabulary pass")
    p.add_argument("--dir", default=str(ROOT / "benchmarks" / "out" / "memory"))
    args = p.parse_args()
    if args.first_pass:
        return first_pass(*args.first_pass)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    dlm.tiny_base_dir()  # built once, before anything is timed
    print("| file | first pass | its peak memory | training run: peak memory | wall time |\n| --- | --- | --- | --- | --- |")
    for mb in map(int, args.sizes_mb.split(",")):
        data = work / f"corpus-{mb}mb.txt"
        if not data.exists() or data.stat().st_size < mb * 1e6:
            write_corpus(data, mb * 1_000_000)
        cmd = [sys.executable, str(ROOT / "train_with_custom_dataset.py"), "--dataset", str(data), "--base_model",
               "tiny", "--batch_size", "64", "--max_minutes", str(args.minutes), "--output_dir",
               str(work / f"model-{mb}mb"), "--overwrite"]
        report = work / "first-pass-seconds"
        scan_peak, _ = peak_rss_mb([sys.executable, __file__, "--first_pass", str(data), str(report)])
        scan_seconds = float(report.read_text())
        peak, seconds = peak_rss_mb(cmd)
        size = data.stat().st_size / 1e6
        print(f"| {size:.0f} MB | {size / scan_seconds:.1f} MB/s ({scan_seconds:.0f} s) | {scan_peak:.0f} MB | {peak:.0f} MB "
              f"| {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
