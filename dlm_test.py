"""Sample text from a trained diffusion language model: Gaussian noise, denoised step by step,
rounded to the nearest token embeddings."""

import dlm_common as dlm


def main():
    p = dlm.ArgumentParser(description=__doc__)
    dlm.add_sampling_args(p, seq_len=32)
    dlm.add_output_args(p, step_interval=100)
    args = p.parse_args()
    dlm.sample_and_print(args, [""], ["text", "token_ids"])


if __name__ == "__main__":
    dlm.run_cli(main)
