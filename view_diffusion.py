"""Watch text emerge from noise: a short sample over a few steps, shown after every step.

Changed tokens are marked and each token shows the model's confidence. --save out.png draws
every step as a row of a picture; --save out.gif makes an animation, one frame per step.
"""

import dlm_common as dlm


def main():
    p = dlm.ArgumentParser(description=__doc__, formatter_class=dlm.argparse.RawDescriptionHelpFormatter)
    dlm.add_sampling_args(p, seq_len=8, steps_flag="--steps", steps=20, device="cpu")
    p.add_argument("--prompt", default="", help="watch a completion of this text form (default: none)")
    dlm.add_guidance_arg(p, "classifier-free guidance with --prompt")
    p.add_argument("--save", help="also save the steps as a .png picture or a .gif animation")
    p.set_defaults(num_samples=1, batch_size=1)
    args = p.parse_args()
    if args.save and dlm.Path(args.save).suffix.lower() not in (".png", ".gif"):
        p.error(f"--save {args.save}: use a .png (picture) or .gif (animation) file name")
    model, tokenizer = dlm.load_for_sampling(args)
    recorder, printer = dlm.StepRecorder(), dlm.StepPrinter(tokenizer)
    sample = dlm.generate_from_flags(args, model, tokenizer, [args.prompt],
                                     callback=lambda step: (printer(step), recorder(step)))[0]
    print(f"final: {sample['text']}")
    if args.save:
        dlm.render_steps(recorder.frames, tokenizer, args.save)
        print(f"saved {args.save}")


if __name__ == "__main__":
    dlm.run_cli(main)
