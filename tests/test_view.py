"""Watching the text form: the terminal display (with and without colour) and the PNG/GIF."""

import io

import pytest
import torch
from PIL import Image

import dlm_common as dlm
from helpers import end_of_text_logit, micro_denoiser, run_script


def steps_for(model, tok, n=5, prompt=""):
    recorder = dlm.StepRecorder()
    dlm.generate(model, tok, [prompt], num_samples=1, seq_len=16, cfg=dlm.SampleConfig(num_steps=n), callback=recorder)
    return recorder.frames


def fake_step(tok, words, confidence, index=0, prompt=0):
    ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in words]).unsqueeze(0)
    is_prompt = (torch.arange(len(words)) < prompt).unsqueeze(0)
    return dlm.Step(index, 3, 0.5, ids, torch.tensor([confidence]), is_prompt, index == 2)


def test_plain_output_marks_changes_and_shows_confidence(tokenizer):
    out = io.StringIO()
    printer = dlm.StepPrinter(tokenizer, stream=out, color=False)
    printer(fake_step(tokenizer, ["The", "Ġcat", "Ġruns"], [1.0, 0.95, 0.3], prompt=1))
    printer(fake_step(tokenizer, ["The", "Ġcat", "Ġsleeps"], [1.0, 0.97, 0.6], index=1, prompt=1))
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 1/3 (t=0.50)" and lines[3] == "step 2/3 (t=0.50)"
    assert "\033[" not in out.getvalue()
    # second step: only the changed token carries the marker, the prompt never does
    assert lines[4] == "  The| cat| sleeps*"
    assert lines[5] == "     |0.97|0.60    "


def test_colour_output_on_a_terminal(tokenizer):
    out = io.StringIO()
    printer = dlm.StepPrinter(tokenizer, stream=out, color=True)
    printer(fake_step(tokenizer, ["The", "Ġcat", "Ġruns"], [0.95, 0.7, 0.2]))
    printer(fake_step(tokenizer, ["The", "Ġcat", "Ġsleeps"], [0.95, 0.7, 0.2], index=1))
    second = out.getvalue().splitlines()[-1]
    assert "\033[32mThe\033[0m" in second  # sure, unchanged: green
    assert "\033[33m cat\033[0m" in second  # middling, unchanged: yellow
    assert "\033[31;1;4m sleeps\033[0m" in second  # unsure and changed: red, bold, underlined


def test_no_color_and_pipes_fall_back_to_plain(tokenizer, monkeypatch):
    class FakeTerminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)  # conftest sets it for the CLI tests
    assert dlm.StepPrinter(tokenizer, stream=FakeTerminal()).color
    monkeypatch.setenv("NO_COLOR", "1")
    assert not dlm.StepPrinter(tokenizer, stream=FakeTerminal()).color
    monkeypatch.delenv("NO_COLOR")
    assert not dlm.StepPrinter(tokenizer, stream=io.StringIO()).color


def test_interval_prints_every_nth_step_and_the_last(tokenizer):
    """The last step is printed even when sampling ends early (step 7 of 10 here)."""
    out = io.StringIO()
    printer = dlm.StepPrinter(tokenizer, interval=3, stream=out, color=False)
    for i in range(7):
        printer(dlm.Step(i, 10, 0.1, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2),
                         torch.zeros(1, 2, dtype=torch.bool), i == 6))
    assert [l.split()[1] for l in out.getvalue().splitlines() if l.startswith("step")] == ["3/10", "6/10", "7/10"]


def test_a_block_model_s_text_shows_once_each_block_is_done(micro_base, corpus, spy_forward):
    """The printer also shows every finished block, whatever the interval, under a header that names
    the block: with the seed README's --step_interval 100 a block model's text would otherwise show
    only at the end."""
    model, tok, _ = micro_denoiser(micro_base, corpus, block_size=4)
    spy_forward(model, change=end_of_text_logit(model, -100.0))  # never ends: 4 blocks of 4
    out, steps = io.StringIO(), []
    printer = dlm.StepPrinter(tok, interval=100, stream=out, color=False)
    dlm.generate(model, tok, [""], seq_len=16, cfg=dlm.SampleConfig(num_steps=20),
                 callback=lambda step: (steps.append(step), printer(step)))
    shown = [line.split(" (")[0] for line in out.getvalue().splitlines() if line.startswith("block")]
    assert shown == [f"block {b}/4, step 4/20" for b in (1, 2, 3, 4)]  # a step a token, left to right
    assert len(steps) == 16


def test_png_has_one_row_per_step(micro_model, tmp_path):
    model, tok, _ = micro_model
    frames = steps_for(model, tok, n=6, prompt="The cat")
    assert len(frames) == 6 and frames[0][2][:2].all()  # the prompt's two tokens
    dlm.render_steps(frames, tok, tmp_path / "steps.png")
    image = Image.open(tmp_path / "steps.png")
    image.verify()
    image = Image.open(tmp_path / "steps.png").convert("RGB")
    # count the rows of cells down the first token column: each is a band of colour
    width, height = image.size
    dlm.render_steps(frames[:3], tok, tmp_path / "three.png")
    assert Image.open(tmp_path / "three.png").size[1] < height  # fewer steps, shorter picture
    assert rows_in(image) == 6


def rows_in(image):
    """Number of cell rows, read off the picture: runs of non-white pixels down a column that
    crosses the grid (cells are separated by white borders)."""
    width, height = image.size
    x = next(x for x in range(width // 3, width) if image.getpixel((x, height // 2)) != (255, 255, 255))
    runs, inside = 0, False
    for y in range(height):
        filled = image.getpixel((x, y)) != (255, 255, 255)
        runs += filled and not inside
        inside = filled
    return runs


def test_gif_has_one_frame_per_step(micro_model, tmp_path):
    model, tok, _ = micro_model
    frames = steps_for(model, tok, n=4)
    dlm.render_steps(frames, tok, tmp_path / "steps.gif")
    gif = Image.open(tmp_path / "steps.gif")
    assert gif.format == "GIF" and gif.n_frames == 4


@pytest.mark.slow
def test_view_diffusion_cli(trained_dir, tmp_path):
    r = run_script("view_diffusion.py", "--model_dir", trained_dir, "--steps", 3, "--seq_len", 8,
                   "--save", tmp_path / "v.png")
    assert [l for l in r.stdout.splitlines() if l.startswith("step ")] == \
           ["step 1/3 (t=0.54)", "step 2/3 (t=0.38)", "step 3/3 (t=0.21)"]  # log SNR -2.5 to +3.5
    assert r.stdout.splitlines()[-2].startswith("final: ")
    assert Image.open(tmp_path / "v.png").format == "PNG"


@pytest.mark.slow
def test_generate_with_prompt_shows_steps_through_the_same_printer(trained_dir):
    r = run_script("generate_with_prompt.py", "--model_dir", trained_dir, "--prompt", "The cat", "--seq_len", 8,
                   "--num_steps", 4, "--step_interval", 2, "--show_steps")
    assert [l.split()[1] for l in r.stdout.splitlines() if l.startswith("step ")] == ["2/4", "4/4"]
    assert r.stdout.splitlines()[-1].startswith("The cat")
