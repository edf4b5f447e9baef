"""Train the diffusion language model on your own text file, one example per line.

Blank lines are skipped; lines longer than --max_len tokens are cut (the trainer says how
many); a line that is not valid UTF-8 stops the run before anything is written.
"""

import dlm_common as dlm


def main():
    p = dlm.ArgumentParser(description=__doc__, formatter_class=dlm.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="text file with one example per line")
    p.add_argument("--max_examples", type=dlm.positive_int, help="use at most this many examples (default: all)")
    dlm.add_train_args(p)
    args = p.parse_args()
    dlm.run_training(args, args.dataset, args.max_examples or 0)


if __name__ == "__main__":
    dlm.run_cli(main)
