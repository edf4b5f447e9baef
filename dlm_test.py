"""Sample text from a trained diffusion language model: Gaussian noise, denoised step by step,
rounded to the nearest token embeddings."""

import dlm_common as dlm


def main():
    p = dlm.ArgumentParser(description=__doc__)
    dlm.add_sampling_args(p, seq_len=32)
    dlm.add_output_args(p, step_interval=100)
    args = p.parse_args()
    model, tokenizer, _, dtype = dlm.load_for_sampling(args)
    printer = dlm.StepPrinter(tokenizer, args.step_interval) if args.show_steps else None
    samples = dlm.generate(model, tokenizer, [""], args.num_samples, args.seq_len, dlm.sample_config(args),
                           args.seed, args.batch_size, printer, dtype)
    dlm.write_and_print(samples, args.output, ["text", "token_ids"])


if __name__ == "__main__":
    dlm.run_cli(main)
