"""Train the diffusion language model on your own data.

--dataset takes a text file (one example per line), JSON lines, JSON, Parquet or CSV (the text in
--text_field), a folder of such files, a dataset saved with save_to_disk, or a Hub dataset name.
Rows with "prompt" and "completion" train the completion after a clean prompt; rows with
"messages" are chats in the base's chat template, the last (assistant) message trained.
Blank examples are skipped; examples longer than --max_len tokens are cut (the trainer says how
many), unless --pack joins them into windows; a line that is not valid UTF-8 or a row without
its field stops the run before anything is written.
"""

import dlm_common as dlm


def main():
    p = dlm.ArgumentParser(description=__doc__, formatter_class=dlm.argparse.RawDescriptionHelpFormatter)
    dlm.add_data_args(p)
    dlm.add_train_args(p)
    args = p.parse_args()
    dlm.run_training(args, args.dataset)


if __name__ == "__main__":
    dlm.run_cli(main)
