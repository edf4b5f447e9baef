"""Complete a prompt with the diffusion language model, steered by classifier-free guidance.

The prompt's tokens stay clean while the rest of the sequence is denoised; guidance pushes the
prediction away from what the model would write without the prompt. --guidance_scale 1 is the
plain conditional model, 0 ignores the prompt, above 1 follows it more strongly. An empty
prompt ("") generates unconditionally, like dlm_test.py.
"""

import dlm_common as dlm


def main():
    p = dlm.ArgumentParser(description=__doc__, formatter_class=dlm.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="text to complete")
    p.add_argument("--prompt_file", help="file with one prompt per line, completed in batches")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user's message in the chat template that "
                   "chat rows trained with, and print the reply")
    dlm.add_guidance_arg(p, "how strongly to follow the prompt")
    dlm.add_sampling_args(p, seq_len=40)
    dlm.add_output_args(p, step_interval=10)
    args = p.parse_args()
    if (args.prompt is None) == (args.prompt_file is None):
        p.error("give either --prompt TEXT or --prompt_file FILE")
    prompts = [args.prompt] if args.prompt is not None else dlm.read_lines(args.prompt_file, "--prompt_file")
    dlm.sample_and_print(args, prompts, ["prompt", "completion", "text", "token_ids"])


if __name__ == "__main__":
    dlm.run_cli(main)
