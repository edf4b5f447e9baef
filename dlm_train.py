"""Train the diffusion language model on the built-in grammar corpus.

The corpus is generated, not downloaded: English-like sentences whose verb must agree with a
subject several words back ("The dogs near the cat run."), so the quality of the samples can
be checked exactly. Use train_with_custom_dataset.py for your own text.
"""

import dlm_common as dlm


def main():
    p = dlm.ArgumentParser(description=__doc__, formatter_class=dlm.argparse.RawDescriptionHelpFormatter)
    dlm.add_train_args(p)
    p.add_argument("--num_examples", type=dlm.positive_int, default=20000,
                   help="sentences in the built-in corpus (default: %(default)s)")
    args = p.parse_args()
    dlm.run_training(args, dlm.builtin_corpus(args.num_examples))


if __name__ == "__main__":
    dlm.run_cli(main)
