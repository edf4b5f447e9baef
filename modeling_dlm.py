"""The model in a DLM folder: the Qwen-backed denoiser, its noise schedule and the sampler.

This file is copied into every model folder DLM saves, so that anyone can use a trained model
without this repository:

    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = model.diffusion_generate(tokenizer(["The cat"], return_tensors="pt").input_ids, steps=20)

It imports only torch, transformers and tqdm (peft for a LoRA model). dlm_common.py, which
trains and serves the model in this repository, uses these same classes and functions.

Symbols follow the diffusion papers: x0 is a clean (unit-norm) token embedding, x_t its noisy
version at noise level t in [0, 1], alpha_bar(t) the share of signal variance, x0_pred the
model's estimate of x0, logits its scores over the diffusion vocabulary.
"""

import functools
import math
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AttentionInterface, AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward


# ----------------------------------------------------------------------------------------
# 1. the noise schedule


@dataclass
class NoiseSchedule:
    """Variance-preserving Gaussian noise, linear in log-SNR (Kingma et al. 2021, "VDM"):

        x_t = sqrt(alpha_bar(t)) * x0 + sqrt(1 - alpha_bar(t)) * eps,   t in [0, 1]
        log SNR(t) = log(alpha_bar / (1 - alpha_bar)) = logsnr_max + t * (logsnr_min - logsnr_max)

    x0 has unit norm, so this SNR is per token, not per dimension: whatever the hidden size,
    a token is certain near log-SNR +4 and lost below -2 (the loss changes only in between:
    benchmarks/NOTES.md, rows 5 and 17).
    """

    num_steps: int = 1000  # training discretisation: t in {1/N, 2/N, ..., 1}
    logsnr_min: float = -6.0
    logsnr_max: float = 6.0

    def alpha_bar(self, t):
        return torch.sigmoid(self.logsnr_max + t * (self.logsnr_min - self.logsnr_max))

    def sample_t(self, shape, generator=None, device="cpu"):
        """Training noise levels, uniform over {1/N, ..., 1}."""
        return torch.randint(1, self.num_steps + 1, shape, generator=generator, device=device) / self.num_steps

    def t_at(self, logsnr):
        """The noise level t where log SNR equals `logsnr` (clipped to [0, 1])."""
        return min(1.0, max(0.0, (self.logsnr_max - logsnr) / (self.logsnr_max - self.logsnr_min)))

    def timesteps(self, k, logsnr_start=None, logsnr_end=None):
        """k+1 noise levels for a k-step sampler, evenly spaced in log SNR from logsnr_start
        (default: the noisiest level, t = 1) to logsnr_end (default: t = 0), on the training grid."""
        start = 1.0 if logsnr_start is None else self.t_at(logsnr_start)
        end = 0.0 if logsnr_end is None else self.t_at(logsnr_end)
        return torch.round(torch.linspace(start, end, k + 1) * self.num_steps) / self.num_steps


# ----------------------------------------------------------------------------------------
# 2. the denoiser


class DLMConfig(PreTrainedConfig):
    """Every hyper-parameter of a trained model; saved as config.json beside its weights. A
    transformers config (a dataclass), so that AutoConfig and AutoModel know DLM folders."""

    model_type = "dlm"

    base_model: str = "Qwen/Qwen2.5-0.5B"  # the base a new model starts from (--base_model)
    vocab: str = "data"  # "data": ids seen in the training data; "full": all of Qwen's ids
    # tokens per training sequence, end-of-text padding included; 0: the longest example plus its
    # end-of-text, at most dlm_common.AUTO_MAX_LEN, found when the data is scanned
    max_len: int = 0
    num_steps: int = NoiseSchedule.num_steps
    logsnr_min: float = NoiseSchedule.logsnr_min
    logsnr_max: float = NoiseSchedule.logsnr_max
    # share of batches trained with self-conditioning (the trainer's default for a block model: 0)
    self_cond_prob: float = 0.75
    token_t_prob: float = 0.5  # share of examples whose tokens each get their own noise level
    prompt_prob: float = 0.25  # share of examples whose random-length prefix stays clean
    uncond_prob: float = 0.15  # share of those whose prefix is hidden, for classifier-free guidance
    # > 0: block diffusion (BD3-LM, Fast-dLLM v2): attention is causal across blocks of this many
    # tokens and bidirectional within one, and, as in the causal base, the output at a token predicts
    # the next one; 0: one bidirectional block, the whole window
    block_size: int = 0
    # in a block model, the last token of every block has no position of its own in the noisy stream:
    # its noisy input is added to the position before it, which predicts it, through a zero-initialised
    # layer. With blocks of 2 the stream is then one position a block, that of the decided first token:
    # 1.5 positions a token to train instead of 2, and at the start the base's own next-token
    # prediction of every token. Better from a random base; alone, worse adapting a pretrained one (NOTES
    # row 95).
    fold_last: bool = False
    # with blocks of 2, folded: no noisy stream at all. The clean stream's position that predicts a
    # block's second token (the one holding the first) also reads the second's noisy input, through the
    # fold layer: one stream, causal, one position a token, as the causal LM has, and decided text is
    # cached with its second tokens read clean. A step costs about a causal-LM step, from a random base
    # and adapting alike (NOTES rows 100, 108)
    one_stream: bool = False
    # the input embeddings of the diffusion vocabulary train, as an ordinary causal LM's do (a copy of
    # their rows, so that the rest of Qwen's table needs no gradient); frozen by default, as the
    # pretrained ones are worth keeping. From a random base, frozen random rows are all x0 and the clean
    # stream have to read (NOTES row 96)
    train_embeddings: bool = False
    lora_r: int = 0  # > 0: Qwen is frozen and trained through LoRA adapters of this rank
    lora_alpha: float = 32.0
    # filled in when the model is built
    vocab_size: int = 0
    end_id: int = 0
    tokenizer_hash: str = ""
    base_hash: str = ""  # a LoRA model's: the hash of the base weights it was trained on (its folder omits them)
    base_config: dict = field(default_factory=dict)

    @property
    def schedule(self):
        return NoiseSchedule(self.num_steps, self.logsnr_min, self.logsnr_max)

    def to_diff_dict(self):
        """config.json (save_pretrained writes this): every DLM field, not only those that differ from
        today's defaults, so that a folder means the same to a later version whose defaults differ,
        plus what AutoModel needs to find this file; none of transformers' generic fields."""
        return {"model_type": self.model_type, "architectures": ["DiffusionLM"], "auto_map": AUTO_MAP,
                **{name: getattr(self, name) for name in own_fields(DLMConfig)}}


# config.json's pointer to the classes of this file, which DLM copies into every model folder
AUTO_MAP = {"AutoConfig": "modeling_dlm.DLMConfig", "AutoModel": "modeling_dlm.DiffusionLM"}


def own_fields(config_class):
    """The names of a config dataclass's fields, less those every transformers config has."""
    generic = {f.name for f in fields(PreTrainedConfig)}
    return [f.name for f in fields(config_class) if f.name not in generic]


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timestep_features(t, dim=64):
    """Sinusoidal features of t in [0, 1] (Transformer positions, scaled to 1000 steps)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = 1000.0 * t.unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def zero_init(layer):
    nn.init.zeros_(layer.weight)
    return layer


def make_bidirectional(body):
    """Qwen is causal; make every attention layer see the whole sequence.

    Under SDPA a missing mask means causal unless the attention module says otherwise, so the flag
    is turned off on each attention module (read by the attention kernels) and on the config (read
    by transformers' mask builder, should anyone run the body through its own forward)."""
    body.config.is_causal = False
    for module in body.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except that a masked call on a CPU reads the key and value heads
    that grouped-query attention shares in place (enable_gqa), as an unmasked call does, where
    transformers first copies them out for every query head. A block model's passes are masked, and
    without the copies batch-64 sampling is about 5% faster, a training step 1-3% (NOTES row 109). On
    a GPU a mask with enable_gqa would fall back to SDPA's slowest kernel, so there it is
    transformers' own."""
    if attention_mask is None or query.device.type != "cpu" or query.shape[1] == key.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("grouped_sdpa", grouped_sdpa)


class Denoiser(nn.Module):
    """The Qwen transformer turned into p(x0 | x_t): logits over the diffusion vocabulary.

    Inputs are unit-norm token embeddings (Qwen's own, frozen, L2-normalised) with Gaussian
    noise, each position at its own noise level t. The noise level and the previous estimate of
    x0 (self-conditioning) enter through zero-initialised layers, so training starts from Qwen's
    own behaviour (Plaid, L2D). The output head starts as Qwen's LM head restricted to the
    diffusion vocabulary (build_model).

    `body` is the base's transformer; without it the config alone builds an empty model of the
    same shape, which load() fills from a checkpoint.
    """

    def __init__(self, config, body=None):
        super().__init__()
        self.config = config
        if body is None:
            body = AutoModel.from_config(AutoConfig.for_model(**config.base_config), dtype=torch.float32)
        make_bidirectional(body)
        if body.config._attn_implementation == "sdpa":  # the default; a kernel asked for by name is kept
            body.set_attn_implementation("grouped_sdpa")
        body.get_input_embeddings().weight.requires_grad_(False)
        if config.lora_r:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=LORA_TARGETS)
            body = get_peft_model(body, lora)
        self.body = body  # a transformers Qwen2Model / Qwen3Model, possibly inside peft
        hidden = body.config.hidden_size
        self.register_buffer("vocab_ids", torch.zeros(config.vocab_size, dtype=torch.long))  # sorted Qwen ids
        self.register_buffer("emb_scale", torch.zeros(()))  # typical norm of a Qwen input embedding
        self.time_mlp = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), zero_init(nn.Linear(hidden, hidden)))
        self.self_cond = zero_init(nn.Linear(hidden, hidden, bias=False))
        if config.block_size and config.fold_last:
            self.fold = zero_init(nn.Linear(hidden, hidden, bias=False))
        if config.train_embeddings:
            self.rows = nn.Parameter(torch.zeros(config.vocab_size, hidden))  # Qwen's rows, copied by build_model
        self.head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.schedule = config.schedule

    @property
    def dim(self):
        return self.body.config.hidden_size

    @property
    def longest(self):
        """The most tokens a text it samples can have: the window it was trained on, or for a block
        model, which samples block after block, as many as the base has positions for."""
        return self.body.config.max_position_embeddings - 1 if self.config.block_size else self.config.max_len

    def embed(self, ids):
        """x0 for any Qwen ids: the unit-norm input embedding (with config.train_embeddings the trained
        row for an id of the diffusion vocabulary, Qwen's own for any other, such as a prompt's)."""
        e = self.body.get_input_embeddings()(ids)
        if self.config.train_embeddings:
            index = self.vocab_index(ids.contiguous()).clamp(max=len(self.vocab_ids) - 1)
            e = torch.where((self.vocab_ids[index] == ids).unsqueeze(-1), self.rows[index], e)
        return F.normalize(e.float(), dim=-1)

    def vocab_embeddings(self):
        """(V, d) unit-norm embeddings of the diffusion vocabulary, the rows x0 lives on."""
        return self.embed(self.vocab_ids)

    def vocab_index(self, ids):
        """Qwen ids -> positions in the diffusion vocabulary (ids must belong to it)."""
        return torch.searchsorted(self.vocab_ids, ids)

    def forward(self, x_t, t, x0_cond, clean_ids=None, offset=0, cache=None, at=None, labels=None):
        """logits (B, n, V) for n tokens from their noisy embeddings x_t (B, n, d), noise levels t
        (B, n), and the previous estimate x0_cond (B, n, d), zeros when there is none. With `at`
        (B, n), a mask, only the logits (N, V) of the N positions it sets: the sampler needs none
        for the positions it has decided, and the head is the larger half of a step (NOTES row 73).
        With `labels` (N,), vocabulary indices, instead their mean cross-entropy, which training
        computes without ever holding all the logits (linear_cross_entropy).

        A block model (config.block_size > 0) also reads clean_ids (B, c), the clean tokens of the
        text from its start, and x_t holds the tokens from position `offset` (a block boundary) on:
        the whole window in training (offset 0, clean_ids the same tokens), one block in sampling
        (clean_ids the c = offset tokens before it). In sampling a ContextCache keeps the clean
        text's keys and values from step to step and block to block: the same logits, computed once."""
        h = self.inputs(x_t, t, x0_cond)
        if not self.config.block_size:
            out = self.transformer(h)
        elif cache is not None:
            out = self.cached_block_outputs(h, clean_ids, offset, cache)
        elif self.config.one_stream:
            out = self.one_stream_outputs(h, clean_ids, offset)
        else:
            out = self.block_outputs(h, clean_ids, offset)
        out = out if at is None else out[at]
        if labels is not None:
            return linear_cross_entropy(out.reshape(-1, out.shape[-1]), self.head.weight, labels.reshape(-1))
        return self.head(out).float()

    def inputs(self, x_t, t, x0_cond):
        """The transformer's input: x_t rescaled to a clean embedding's norm at every noise level, plus
        the noise level and the previous estimate through their zero-initialised layers."""
        alpha_bar = self.schedule.alpha_bar(t).unsqueeze(-1)
        dtype = self.head.weight.dtype  # float32, or the half precision load() was asked for
        h = (x_t * (self.emb_scale / torch.sqrt(alpha_bar + (1 - alpha_bar) * self.dim))).to(dtype)
        return h + self.time_mlp(timestep_features(t).to(dtype)) + self.self_cond(x0_cond.to(dtype))

    def with_start(self, clean_ids):
        """(B, 1 + c): the clean text after end-of-text, a block model's start token."""
        start = torch.full((len(clean_ids), 1), self.config.end_id, dtype=torch.long, device=clean_ids.device)
        return torch.cat([start, clean_ids], 1)

    def clean_inputs(self, ids):
        """The transformer's input for clean tokens: noise level 0 (one level for all of them, so that
        its features are computed once), and themselves as the estimate."""
        x0 = self.embed(ids)
        return self.inputs(x0, torch.zeros(1, 1, device=ids.device), x0)

    def clean_stream(self, clean_ids, first=0):
        """The transformer's input for the clean stream's positions from `first` on: position p holds
        token p - 1 (the start token at 0). With config.one_stream each position holding a block's first
        token also reads the block's second token, clean, through self.fold, as one_stream_outputs
        reads it noisy."""
        ids = self.with_start(clean_ids)[:, first:]
        h = self.clean_inputs(ids)
        if not self.config.one_stream:
            return h
        # token p is held by position p + 1, the next one; the last position's token p is not clean yet
        p = torch.arange(first, first + ids.shape[1], device=ids.device)
        read = ((p % 2 == 1) & (p < clean_ids.shape[1])).view(1, -1, 1)
        return h + read * self.fold(h.roll(-1, 1))

    def one_stream_outputs(self, h, clean_ids, offset):
        """block_outputs for config.one_stream: a single causal stream in which position p holds token
        p - 1, clean, and predicts token p, and the position holding a block's first token also reads the
        second one's input from `h` (noisy, or decided) through self.fold. In training clean_ids holds
        every token; sampling one block passes the text before it, and the block's first token comes
        from `h` too."""
        stop = offset + h.shape[1]  # positions 0 .. stop - 1 predict tokens 0 .. stop - 1
        known = min(clean_ids.shape[1], stop - 1)  # tokens held clean; the rest of the held ones are in h
        held = torch.cat([self.clean_inputs(self.with_start(clean_ids[:, :known])), h[:, known - offset:-1]], 1)
        read = torch.cat([held[:, 1:offset + 1], h], 1)  # token p's input, for position p (position p + 1 holds it)
        odd = (torch.arange(stop, device=h.device) % 2 == 1).view(1, -1, 1)
        causal = torch.ones(stop, stop, dtype=torch.bool, device=h.device).tril()
        out = self.transformer(held + odd * self.fold(read), causal[None, None])
        return out[:, offset:]

    def noisy_stream(self, h, offset):
        """(the noisy stream's inputs, the token index of each of its positions) for the n noisy tokens in
        `h`, from position `offset`: one position a token, or with config.fold_last none for the last
        token of a block (or of the text), whose input joins the position before it through self.fold."""
        token = torch.arange(offset, offset + h.shape[1], device=h.device)
        if not self.config.fold_last:
            return h, token
        last = ((token + 1) % self.config.block_size == 0) | (token == token[-1])
        before_last = (last.roll(-1) & ~last).view(1, -1, 1)
        h = h + before_last * self.fold(h.roll(-1, 1))
        return h[:, ~last], token[~last]

    def block_outputs(self, h, clean_ids, offset):
        """Hidden states that predict the n noisy tokens in `h`, BD3-LM's two streams in one pass:
        the clean text (end-of-text first, as a start token) attends causally, like the base; each
        noisy block attends to itself and to the clean tokens of the blocks before it. As in the
        causal base, a token is predicted from the position before it: within a block from the noisy
        stream, the first token of a block from the clean stream (the base's own next-token
        prediction, the way Fast-dLLM v2 and Dream keep what the base knows)."""
        n = h.shape[1]
        # no noisy token reads the clean tokens of the last block, nor predicts from them (in training
        # the last block's; in sampling, which passes only the text before the block, none)
        last_block = (offset + n - 1) // self.config.block_size * self.config.block_size
        clean = self.with_start(clean_ids[:, :last_block])
        h_clean = self.clean_inputs(clean)
        c = clean.shape[1] - 1
        h, noisy_token = self.noisy_stream(h, offset)
        # token index of every stream position: the clean stream from -1 (the start), then the noisy one
        token = torch.cat([torch.arange(-1, c, device=h.device), noisy_token])
        is_clean = torch.arange(len(token), device=h.device) <= c
        block = torch.div(token, self.config.block_size, rounding_mode="floor")
        q, k = (lambda a: a.unsqueeze(1)), (lambda a: a.unsqueeze(0))
        mask = ((q(is_clean) & k(is_clean) & (k(token) <= q(token)))
                | (~q(is_clean) & k(is_clean) & (k(block) < q(block)))
                | (~q(is_clean) & ~k(is_clean) & (k(block) == q(block))))
        out = self.transformer(torch.cat([h_clean, h], 1), mask[None, None], token + 1)
        j = torch.arange(offset, offset + n, device=h.device)  # the tokens to predict, each from token j - 1
        from_clean = j.clamp(max=c)  # the clean position of token j - 1 is j (the start is 0)
        from_noisy = c + 1 + torch.searchsorted(noisy_token, j - 1).clamp(max=len(noisy_token) - 1)
        return out[:, torch.where(j % self.config.block_size == 0, from_clean, from_noisy)]

    def cached_block_outputs(self, h, clean_ids, offset, cache):
        """block_outputs for one block in sampling, from the cache. The clean tokens not yet in it (the
        start token, or the block decided last) join the block's first pass: they attend causally, like
        the base decoding with its KV cache, and are kept; the block's noisy stream attends to all the
        clean text and to itself, and is not kept. One pass less per block than running the clean
        tokens on their own (NOTES row 71). With cache.decided a one-stream model keeps its noisy
        stream's one position too, the block's first token's, so that the next block's first pass runs
        only the second token's (SampleConfig.cache_decided)."""
        n = h.shape[1]
        h, noisy_token = self.noisy_stream(h, offset)
        if cache.pending and clean_ids.shape[1] > cache.length:  # its block is over: the position is clean text's
            cache.length += 1
        m, mask, positions = 1 + clean_ids.shape[1] - cache.length, None, noisy_token + 1  # clean tokens not yet cached
        if m:
            h = torch.cat([self.clean_stream(clean_ids, cache.length), h], 1)
            positions = torch.cat([torch.arange(cache.length, cache.length + m, device=h.device), positions])
            key = torch.arange(cache.length + h.shape[1], device=h.device)  # the cache, the new clean tokens, the block
            query = key[cache.length:]
            mask = ((key.unsqueeze(0) <= query.unsqueeze(1)) | (query >= cache.length + m).unsqueeze(1))[None, None]
        if not h.shape[1]:  # a block of one token, whose token came from the clean text: nothing to run
            return cache.last
        cache.keep = h.shape[1] if cache.decided and self.config.one_stream else m
        out = self.transformer(h, mask, positions, cache)
        cache.keep = 0
        if m:
            cache.length, cache.last = cache.length + m, out[:, m - 1:m]
        # token j from position j - 1: the first of the block from the last clean token, as in block_outputs
        later = torch.arange(offset + 1, offset + n, device=h.device)
        return torch.cat([cache.last, out[:, m + torch.searchsorted(noisy_token, later - 1)]], 1)

    def transformer(self, h, mask=None, positions=None, cache=None):
        """Qwen's decoder layers; with no attention mask every position sees every other (and all of
        the cache's). The layers are called directly rather than through the Qwen model's forward,
        which would rebuild its causal-mask machinery on every call (a fifth of a sampling step for
        the tiny base)."""
        qwen = self.body.get_base_model() if self.config.lora_r else self.body
        positions = (torch.arange(h.shape[1], device=h.device) if positions is None else positions).unsqueeze(0)
        rope = qwen.rotary_emb(h, positions)
        for layer in qwen.layers:  # a slice of the ModuleList would build a new one every pass
            h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=positions, cache=cache)
        return qwen.norm(h)


class ContextCache:
    """The keys and values of the clean text before the block being sampled, per layer (a block
    model's KV cache, BD3-LM's): each token's are computed once, in the first pass of the block after
    its own, and read at every later step. Qwen's attention layers call update(); of a pass's
    positions only the first `keep` are kept (the clean text), not a denoising step's own.

    With `decided` (SampleConfig.cache_decided), a one-stream model's pass over a block also keeps its
    one position, the block's first token's: until a later pass of the block replaces it, or the next
    block makes it clean text (cached_block_outputs)."""

    def __init__(self, decided=False):
        self.keys, self.values = {}, {}
        self.length = 0  # clean positions cached: the start token and the text after it
        self.last = None  # the output at the last of them, which predicts the next block's first token
        self.keep = 0
        self.decided = decided

    @property
    def pending(self):
        """A block's position is kept after the clean ones, not yet counted in length."""
        return any(key.shape[-2] > self.length for key in self.keys.values())

    def update(self, key, value, layer_idx, **kwargs):
        if layer_idx in self.keys:  # a pending position is read only once counted
            key = torch.cat([self.keys[layer_idx][..., :self.length, :], key], -2)
            value = torch.cat([self.values[layer_idx][..., :self.length, :], value], -2)
        if self.keep:
            end = self.length + self.keep
            self.keys[layer_idx], self.values[layer_idx] = key[..., :end, :], value[..., :end, :]
        return key, value


def condition_on_prompt(x_t, t, x0_cond, x0, is_prompt, hidden):
    """Prompt positions are never noised: they carry their clean x0 at level 0. Where `hidden`
    (B, 1) is set, the prompt is withheld instead (pure noise's mean, 0, at level 1): that is
    the unconditional model classifier-free guidance needs."""
    known, unknown = (is_prompt & ~hidden).unsqueeze(-1), (is_prompt & hidden).unsqueeze(-1)
    x_t = torch.where(known, x0, x_t).masked_fill(unknown, 0.0)
    x0_cond = torch.where(known, x0, x0_cond).masked_fill(unknown, 0.0)
    t = t.masked_fill(known[..., 0], 0.0).masked_fill(unknown[..., 0], 1.0)
    return x_t, t, x0_cond


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits h @ weight.T (N, V) against targets (N,), a chunk of rows at a
    time, with the gradient computed on the way (Liger's fused linear cross-entropy): no (N, V)
    tensor is ever whole. On a CPU, the logits, their log-softmax and its gradient were each a fresh
    block of a hundred megabytes or more a step, page-faulted in anew (NOTES row 99)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        grad_h = torch.empty_like(h)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), device=h.device)
        for lo in range(0, len(h), chunk):
            h_c, y = h[lo:lo + chunk], targets[lo:lo + chunk]
            log_probs = torch.log_softmax((h_c @ weight.T).float(), -1)
            total -= log_probs.gather(1, y[:, None]).sum()
            grad = log_probs.exp_()  # d(sum of losses) / d(logits): softmax minus one-hot
            grad[torch.arange(len(y), device=y.device), y] -= 1
            grad_h[lo:lo + chunk] = grad.to(weight.dtype) @ weight
            if ctx.needs_input_grad[1]:
                grad_weight.addmm_(grad.T, h_c.float())
        ctx.save_for_backward(grad_h, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / len(h)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        scale = grad_loss / len(grad_h)
        return grad_h * scale.to(grad_h.dtype), (grad_weight * scale).to(ctx.weight_dtype), None, None


def linear_cross_entropy(h, weight, targets):
    """F.cross_entropy(h @ weight.T, targets) for h (N, d), weight (V, d), in chunks of rows; where no
    gradient is needed, the loss alone, in the same chunks. A chunk holds about a million logits (row
    99's fastest), and at least 128 rows, so that each read of a large vocabulary's head serves many."""
    chunk = max(128, (1 << 20) // len(weight))
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h, weight, targets, chunk)
    total = sum((F.cross_entropy((h[lo:lo + chunk] @ weight.T).float(), targets[lo:lo + chunk], reduction="sum")
                 for lo in range(0, len(h), chunk)), h.new_zeros((), dtype=torch.float32))
    return total / len(h)


def x0_estimate(logits, vocab_embeddings, temperature=1.0):
    """Score interpolation (CDCD): the expected clean embedding under the predicted tokens."""
    if temperature != 1.0:  # shifted first, so that a tiny temperature gives the argmax, not inf - inf
        logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    return torch.softmax(logits, dim=-1) @ vocab_embeddings


# ----------------------------------------------------------------------------------------
# 3. sampling


ORDERS = ("auto", "confidence", "left_to_right")  # SampleConfig.order


@dataclass
class SampleConfig:
    """How to sample; shared by dlm_test.py, generate_with_prompt.py and view_diffusion.py."""

    num_steps: int = 0  # 0 = the model's own: its training discretisation (config num_steps), or its block size
    temperature: float = 1.0  # softmax temperature of the clean-token estimate
    guidance_scale: float = 5.0  # classifier-free guidance; 1 = plain conditional, 0 = unconditional
    plausibility: float = 0.3  # guidance picks among tokens at least this likely relative to the top one
    # Steps are spent only where tokens are being decided: below log SNR -2.5 the model can only
    # predict the unigram marginal, above +3.5 every token is already certain (NOTES rows 17 and 34).
    logsnr_start: float = -2.5
    logsnr_end: float = 3.5
    # Positions are decided a few at a time (in `order`), and then stay fixed as clean context:
    # tokens picked in the same step are what clash ("A girls"; NOTES row 43). Each step decides
    # its share of the open positions, and any whose top token is at least this likely (Fast-dLLM's
    # threshold).
    decide: float = 0.9
    # The share is forced on at most this many of the steps, evenly spaced and ending with the last,
    # so that with more steps positions are decided at about the noise levels they are decided at
    # with this many; forcing one per step would decide all of them in the first few steps, while the
    # noise is still high, and samples would repeat (NOTES row 47).
    decision_steps: int = 20
    eta: float = 0.0  # DDIM's eta: 0 is deterministic, 1 re-draws the DDPM posterior's share of the noise
    # A decided position's token is drawn from the prediction (at `temperature`) instead of rounded
    # from the clean estimate to its nearest embedding, which favours the likeliest tokens. None:
    # drawn in a block model, whose rounded samples barely vary (a block's first token does not
    # depend on the noise: NOTES row 76), rounded in any other.
    draw: bool | None = None
    # Which open positions a step's share decides first: "confidence", the most confident (NOTES row
    # 43); "left_to_right", the leftmost; "auto", left to right in a block model, whose first token of
    # a block is the base's own next-token prediction and whose later ones read the tokens decided
    # before them, and most confident first in a whole-window model (NOTES row 74). Whatever the order,
    # a block model decides a block's first token first (decide_first_token).
    order: str = "auto"
    # Gumbel noise of this scale on the log-confidence that orders the decisions: 0 decides the most
    # confident positions first, a large scale decides in random order (MaskGIT's choice temperature).
    order_noise: float = 0.0
    # A block model keeps the keys and values of the text before the block it samples (ContextCache)
    # rather than recomputing them at every step; off only to check that the two agree (a one-stream
    # model's agree with cache_decided off too).
    cache: bool = True
    # A one-stream block model's cache also keeps the position of a block's first token from the pass
    # that decided the second, which read the second noisy, as training's context positions do
    # (one_stream_outputs); otherwise the next block's first pass recomputes it with the second clean.
    # Every pass then runs one position, as the causal LM's does. The text is no worse (NOTES row 113);
    # off, the cached samples are exactly the uncached ones.
    cache_decided: bool = True


@dataclass
class Step:
    """What the per-step callback sees after each denoising step."""

    index: int  # 0 .. num_steps-1
    num_steps: int
    t: float  # noise level the step arrived at
    token_ids: torch.Tensor  # (B, L) Qwen ids of the current best guess
    confidence: torch.Tensor  # (B, L) the model's probability of those tokens
    is_prompt: torch.Tensor  # (B, L)
    last: bool  # no step follows: every position is decided (sampling can end before num_steps)
    block_done: bool = False  # every position of the step's block is decided: a block model's text grew a block
    block: int = 0  # the block the step denoises (a block model's), from 0
    num_blocks: int = 1  # of this many, at most: sampling stops after the block in which every text ends


class Prediction(NamedTuple):
    """One step's prediction of the clean tokens: each tensor a row (V,) for every position that
    `at` (B, L) sets, the open ones, in order (N, V); or, without `at`, (B, L, V)."""

    log_probs: torch.Tensor  # guided log p(x0 | x_t, prompt): what a decided position becomes
    steering: torch.Tensor  # what paces the decisions and steers the trajectory
    allowed: torch.Tensor = None  # the tokens a decision may pick (None: any)
    at: torch.Tensor = None

    def spread(self, rows, fill):
        """(B, L, ...) from one value per row, `fill` at the positions without a row."""
        if self.at is None:
            return rows
        out = rows.new_full(self.at.shape + rows.shape[1:], fill)
        out[self.at] = rows
        return out

    def rows(self, where):
        """Which rows belong to the positions `where` (B, L) sets, a subset of `at`'s."""
        return where if self.at is None else where[self.at]

    @property
    def extrapolating(self):
        """Guidance above 1: the tokens decided follow log_probs, all else the conditional model."""
        return self.allowed is not None


def guided_log_probs(model, x_t, t, x0_cond, x0_prompt, is_prompt, guidance_scale, plausibility, at=None):
    """log p(x0 | x_t, prompt), pushed away from the unconditional prediction by classifier-free
    guidance: uncond + s * (cond - uncond) on log-probabilities, as a Prediction for the positions
    `at` sets (default: all). s = 1 is exactly the conditional model, s = 0 the unconditional one,
    and up to 1 the guided scores also steer. Above 1 they only pick the decided tokens, under two
    guards that keep them from saturating into junk: they are rescaled to the conditional
    prediction's spread (Lin et al. 2024), and only tokens the conditional model itself finds
    plausible (at least `plausibility` times its top token's probability) may be picked (Li et al.
    2023); the conditional prediction steers."""
    B = len(x_t)
    if guidance_scale == 1.0 or not is_prompt.any():
        hidden = torch.zeros(B, 1, dtype=torch.bool, device=x_t.device)
        cond = F.log_softmax(model(*condition_on_prompt(x_t, t, x0_cond, x0_prompt, is_prompt, hidden), at=at), -1)
        return Prediction(cond, cond, at=at)
    # the conditional and the unconditional prediction in one batch
    hidden = torch.arange(2 * B, device=x_t.device).unsqueeze(1) >= B
    two = lambda a: None if a is None else torch.cat([a, a])
    inputs = condition_on_prompt(two(x_t), two(t), two(x0_cond), two(x0_prompt), two(is_prompt), hidden)
    cond, uncond = F.log_softmax(model(*inputs, at=two(at)), -1).chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_scale <= 1:  # between the two predictions: nothing to guard
        guided = F.log_softmax(guided, -1)
        return Prediction(guided, guided, at=at)
    # extrapolating; the guards phase in from s = 1 to s = 2
    guided = guided * (cond.std(-1, keepdim=True) / guided.std(-1, keepdim=True).clamp(min=1e-6))
    floor = math.log(plausibility * min(1.0, guidance_scale - 1))
    return Prediction(F.log_softmax(guided, -1), cond, cond >= cond.max(-1, keepdim=True).values + floor, at)


def ddim_step(x_t, x0_pred, alpha_t, alpha_s, eta, generator=None):
    """x_s from x_t (Song et al. 2021, eq. 12): keep the noise that x0_pred implies, except a
    fresh share sigma^2 = eta^2 * (1 - alpha_s) / (1 - alpha_t) * (1 - alpha_t / alpha_s); eta = 1
    is the DDPM posterior. If x_t ~ q(x_t | x0) and x0_pred = x0, then x_s ~ q(x_s | x0) for any eta."""
    eps = (x_t - alpha_t.sqrt() * x0_pred) / (1 - alpha_t).sqrt()
    sigma2 = (eta ** 2 * (1 - alpha_s) / (1 - alpha_t) * (1 - alpha_t / alpha_s)).clamp(min=0.0)
    x_s = alpha_s.sqrt() * x0_pred + (1 - alpha_s - sigma2).clamp(min=0.0).sqrt() * eps
    if eta > 0:
        x_s = x_s + sigma2.sqrt() * torch.randn(x_t.shape, generator=generator, device=x_t.device)
    return x_s


def nearest_neighbour(x, vocab_embeddings, allowed=None, chunk=4096):
    """Index of the closest vocabulary row (cosine; rows are unit norm) for every vector in x,
    as batched matrix products over chunks of positions; with `allowed` (a mask over the rows
    for every vector), the closest of the allowed rows."""
    flat = x.reshape(-1, x.shape[-1])
    parts = flat.split(chunk)
    masks = [None] * len(parts) if allowed is None else allowed.reshape(-1, allowed.shape[-1]).split(chunk)
    idx = []
    for part, mask in zip(parts, masks):
        similarity = part @ vocab_embeddings.T
        idx.append((similarity if mask is None else similarity.masked_fill(~mask, -math.inf)).argmax(-1))
    return torch.cat(idx).reshape(x.shape[:-1])


def positions_to_decide(log_confidence, open_, steps_left, threshold, every=1, order=None):
    """(B, L) mask of the open positions to decide after a step: every one whose top token is at
    least `threshold` likely, and on every `every`-th step counted back from the last, at least the
    first 1/(such steps left) of the open ones by `order` (default: the most confident), so that the
    last step decides all that are left (the order masked diffusion LMs unmask in: MaskGIT, LLaDA)."""
    sure = open_ & (log_confidence >= math.log(threshold))
    if (steps_left - 1) % every:
        return sure
    n = torch.ceil(open_.sum(1, keepdim=True) / ((steps_left - 1) // every + 1))
    order = log_confidence if order is None else order
    rank = order.masked_fill(~open_, -math.inf).argsort(1, descending=True).argsort(1)
    return sure | (open_ & (rank < n))


def draw_tokens(log_probs, allowed, temperature, generator=None):
    """Vocabulary indices drawn from softmax(log_probs / temperature), rows (N, V), among `allowed`."""
    scores = (log_probs - log_probs.amax(-1, keepdim=True)) / temperature
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[:, 0]


def gumbel(shape, generator=None):
    u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else "cpu")
    return -torch.log(-torch.log(u.clamp(min=1e-20)))


def for_model(cfg, model):
    """cfg with its automatic settings made concrete: a block model decides left to right and draws
    its tokens, any other decides the most confident positions first and rounds."""
    if cfg.order not in ORDERS:
        raise ValueError(f"order {cfg.order!r} is none of {', '.join(ORDERS)}")
    blocks = bool(model.config.block_size)
    order = ("left_to_right" if blocks else "confidence") if cfg.order == "auto" else cfg.order
    return replace(cfg, order=order, draw=blocks if cfg.draw is None else cfg.draw)


@torch.inference_mode()  # lighter than no_grad: a tenth of a batch-1 sample with the tiny base
def sample(model, prompt_ids, is_prompt, cfg=SampleConfig(), generator=None, callback=None, progress=True,
           length=None):
    """Denoise Gaussian noise into Qwen ids (B, L) with DDIM steps from log SNR cfg.logsnr_start
    to cfg.logsnr_end, deciding positions along the way: a decided position is rounded to the
    nearest token embedding (with cfg.draw, its token is drawn from the prediction) and is clean
    context (noise level 0) from then on.

    prompt_ids / is_prompt (B, L) hold each row's clean prefix (none: is_prompt all False).
    L should be the model's max_len: the model only knows where text starts and ends within
    the window it was trained on. A shorter text is asked for with `length`: positions from
    there on are decided as end-of-text from the start; the steps shown and the ids returned
    are the first `length` positions. A block model denoises one block after the other, each
    in cfg.num_steps passes with all the text before it as clean context (cached, with cfg.cache):
    the first decides the block's first token (decide_first_token), the others (at least one) denoise
    the rest. So L may exceed its window; it stops after the block in which every row's text
    has ended. `callback(Step)` runs after every step: it is how --show_steps and
    view_diffusion.py watch."""
    model.eval()
    cfg = for_model(cfg, model)
    B, L = prompt_ids.shape
    n = length or L
    is_tail = (torch.arange(L, device=prompt_ids.device) >= n).expand(B, L)
    token_ids = prompt_ids.masked_fill(is_tail, model.config.end_id)  # Qwen ids where decided
    decided = is_prompt | is_tail  # positions whose token is known; the rest are open
    size = model.config.block_size or L
    cache = ContextCache(cfg.cache_decided) if model.config.block_size and cfg.cache else None
    # computed once, when a step first needs every row: with Qwen's whole vocabulary a large tensor, and one
    # that a block model drawing its tokens never needs
    vocab_embeddings = functools.cache(model.vocab_embeddings)
    starts = range(0, L, size)
    by_block = len(starts) > 1  # one progress bar: over the blocks, or else over denoise's steps
    for lo in tqdm(starts, desc="sampling", unit="block", disable=not (progress and by_block), leave=False):
        block = slice(lo, min(lo + size, L))
        ended = (decided & (token_ids == model.config.end_id))[:, :lo].any(1)
        if ended.all():  # every text has ended: the rest is end-of-text
            token_ids[:, lo:] = torch.where(decided[:, lo:], token_ids[:, lo:], model.config.end_id)
            break
        denoise(model, vocab_embeddings, token_ids, decided, is_prompt, block, cfg, generator, callback,
                progress and not by_block, n, cache)
    return token_ids[:, :n]  # every position is decided now


def denoise(model, vocab_embeddings, token_ids, decided, is_prompt, block, cfg, generator, callback, progress, n,
            cache=None):
    """The sampling loop over the positions of `block` (all of them for a model without blocks):
    token_ids and decided (B, L) are updated in place as positions are decided. vocab_embeddings() is
    model.vocab_embeddings(), computed once a sample."""
    if decided[:, block].all():  # a block the prompt fills
        return
    # unless told, a block model takes a step per token of a block, the passes its left-to-right decisions
    # need: more steps only wait for the decisions they space out (NOTES row 111)
    schedule, num_steps = model.schedule, cfg.num_steps or model.config.block_size or model.schedule.num_steps
    x0_known = model.embed(token_ids[:, block])  # clean embeddings where decided
    x_t = torch.randn(x0_known.shape, generator=generator, device=x0_known.device)
    # a block model's first pass over a block decides its first token (decide_first_token); the rest of
    # the passes are the denoising steps
    first = int(bool(model.config.block_size) and not decided[:, block.start].all())
    num_steps = max(1, num_steps - first)
    ts = schedule.timesteps(num_steps, cfg.logsnr_start, cfg.logsnr_end).tolist()
    size = model.config.block_size
    where = dict(block=block.start // size, num_blocks=-(-n // size)) if size else {}  # for the callback
    if first:
        pred = decide_first_token(model, vocab_embeddings, x_t, x0_known, token_ids, decided, is_prompt, block, cfg,
                                  generator, cache)
        done = bool(decided[:, block].all())
        if callback is not None:
            ids, confidence, last = report(model, pred, token_ids, decided, slice(block.start, block.start + 1), n, done)
            callback(Step(0, first + num_steps, ts[0], ids, confidence, is_prompt[:, :n], last, done, **where))
        if done:
            return
    x0_pred = torch.zeros_like(x_t)
    here = decided[:, block]
    every = max(1, num_steps // cfg.decision_steps)  # steps between forced decisions
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        # decided positions enter as clean tokens at level 0; of those, guidance hides only the prompt
        known = here.unsqueeze(-1)
        x_t, x0_pred = torch.where(known, x0_known, x_t), torch.where(known, x0_known, x0_pred)
        # the previous estimate is fed back only to a model trained with it (self-conditioning): one
        # trained without has only seen zeros at its open positions, and reads an estimate as a
        # decided token (NOTES row 81)
        x0_cond = x0_pred if model.config.self_cond_prob else torch.where(known, x0_known, 0.0)
        t, s = torch.full(here.shape, ts[i], device=x_t.device).masked_fill(here, 0.0), ts[i + 1]
        # 1. predict the open positions' clean tokens
        open_ = ~here
        pred = predict(model, x_t, t, x0_cond, x0_known, token_ids, is_prompt, block, cfg, cache, open_)
        # 2. decide a share of the open positions (the surest, or the leftmost), and write their tokens back
        new, chosen = decide(pred, open_, num_steps - i, every, cfg, vocab_embeddings, generator)
        settle(model, x0_known, token_ids, decided, block, new, chosen)
        here = here | new
        done = bool(here.all())
        # 3. DDIM: move the positions still open, if any, from level t to level s around their clean estimate x0_pred
        #    (only theirs: a decided position's is never read, and at batch 1 the estimate of one position
        #    costs as much as the head; NOTES row 103)
        if not done:
            estimate = x0_estimate(pred.steering[pred.rows(~here)], vocab_embeddings(), cfg.temperature)
            x0_pred = estimate.new_zeros(x_t.shape)  # in the estimate's precision (autocast's, with --dtype)
            x0_pred[~here] = estimate
            alpha_t, alpha_s = schedule.alpha_bar(t).unsqueeze(-1), schedule.alpha_bar(torch.tensor(s))
            x_t = ddim_step(x_t, x0_pred, alpha_t, alpha_s, cfg.eta, generator)
        # 4. report; nothing is left to decide after the last step, and then more steps would change nothing
        if callback is not None:
            ids, confidence, last = report(model, pred, token_ids, decided, block, n, done)
            callback(Step(first + i, first + num_steps, s, ids, confidence, is_prompt[:, :n], last, done, **where))
        if done:
            break


def decide_first_token(model, vocab_embeddings, x_t, x0_known, token_ids, decided, is_prompt, block, cfg, generator,
                       cache):
    """A block model's first pass over a block: it decides the block's first token in every row where
    that is open, running the model on that position alone (x_t etc. (B, size, d) are the block's), and
    returns its Prediction. A block model predicts a block's first token from the clean text before it
    alone, and its later tokens only once the first is clean (diffusion_loss), so the first is decided
    before they are denoised; a step over the whole block would predict them from a noisy first token,
    a state training never shows (NOTES row 105)."""
    at = slice(block.start, block.start + 1)
    open_ = ~decided[:, at]
    t = torch.ones(open_.shape, device=x_t.device)  # the noise level of the inputs: none reach the prediction
    pred = predict(model, x_t[:, :1], t, torch.zeros_like(x_t[:, :1]), x0_known[:, :1], token_ids, is_prompt, at, cfg,
                   cache, open_)
    new, chosen = decide(pred, open_, 1, 1, cfg, vocab_embeddings, generator)
    settle(model, x0_known[:, :1], token_ids, decided, at, new, chosen)
    return pred


def settle(model, x0_known, token_ids, decided, block, new, chosen):
    """Write the positions of `block` just decided (the mask `new`, their vocabulary indices `chosen`)
    back in place: their clean embeddings into x0_known (the block's), their Qwen ids, and decided."""
    ids = model.vocab_ids[chosen]
    x0_known[new] = model.embed(ids)
    token_ids[:, block][new] = ids
    decided[:, block] |= new


def predict(model, x_t, t, x0_cond, x0_known, token_ids, is_prompt, block, cfg, cache, open_):
    """Step 1: the Prediction at this step, for the open positions. A block model reads everything
    before the block as clean text, the prompt included, so guidance does not apply to it."""
    if model.config.block_size:
        logits = model(x_t, t, x0_cond, token_ids[:, :block.start], block.start, cache=cache, at=open_)
        log_probs = F.log_softmax(logits, -1)
        return Prediction(log_probs, log_probs, at=open_)
    return guided_log_probs(model, x_t, t, x0_cond, x0_known, is_prompt[:, block], cfg.guidance_scale,
                            cfg.plausibility, open_)


def decide(pred, open_, steps_left, every, cfg, vocab_embeddings, generator):
    """Step 2: (mask of the open positions to decide now, their vocabulary indices).

    The positions are those the steering prediction is surest of, or with cfg.order "left_to_right"
    the leftmost, of which the threshold may decide only the first early (positions_to_decide).
    Each becomes the nearest embedding to its guided estimate that guidance allows, or with cfg.draw
    a token drawn from the guided prediction. Guidance above 1 acts only here, on the token a
    position becomes: steered by the near one-hot guided estimate, the trajectory forgets its noise
    and a prompt gets the same completion every time (NOTES row 45), and sharpened scores overstate
    confidence."""
    log_confidence = pred.spread(pred.steering.max(-1).values, -math.inf)
    order = None
    if cfg.order == "left_to_right":
        order = -torch.arange(open_.shape[1], device=open_.device).float().expand(open_.shape)
        # only the leftmost open position was predicted from every token before it, so the threshold
        # may decide it early, never a later one: a block model trained on decided prefixes can be
        # sure of junk where the tokens before are still noise (NOTES row 81)
        log_confidence = log_confidence.masked_fill(open_.cumsum(1) > 1, -math.inf)
    elif cfg.order_noise:
        order = log_confidence + cfg.order_noise * gumbel(log_confidence.shape, generator)
    new = positions_to_decide(log_confidence, open_, steps_left, cfg.decide, every, order)
    rows = pred.rows(new)
    allowed = None if pred.allowed is None else pred.allowed[rows]
    if cfg.draw:
        return new, draw_tokens(pred.log_probs[rows], allowed, cfg.temperature, generator)
    x0_new = x0_estimate((pred.log_probs if pred.extrapolating else pred.steering)[rows], vocab_embeddings(),
                         cfg.temperature)
    return new, nearest_neighbour(x0_new, vocab_embeddings(), allowed)


def report(model, pred, token_ids, decided, block, n, done):
    """Step 4: what the callback sees of the first n positions: (ids, confidence, last). The decided
    tokens at confidence 1, elsewhere the likeliest token and its probability; `last` when the
    block is `done` and no later block will be denoised."""
    confidence, best = pred.log_probs.max(-1)
    here = decided[:, block]
    ids, conf = token_ids.clone(), decided.float()
    ids[:, block] = torch.where(here, token_ids[:, block], model.vocab_ids[pred.spread(best, 0)])
    conf[:, block] = pred.spread(confidence.exp(), 1.0).masked_fill(here, 1.0)
    ended = (decided & (token_ids == model.config.end_id))[:, :block.stop].any(1).all()
    return ids[:, :n], conf[:, :n], done and (block.stop >= n or bool(ended))


# ----------------------------------------------------------------------------------------
# 4. the model as transformers knows it: AutoModel.from_pretrained(folder, trust_remote_code=True)


def prompt_window(input_ids, attention_mask, width, end_id):
    """(prompt_ids, is_prompt), both (B, width): each row's prompt tokens (those attention_mask keeps,
    wherever the padding was) from position 0, end-of-text after them."""
    B = len(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    n_prompt = attention_mask.sum(1, keepdim=True)
    is_prompt = torch.arange(width, device=input_ids.device).expand(B, width) < n_prompt
    prompt_ids = torch.full((B, width), end_id, dtype=torch.long, device=input_ids.device)
    prompt_ids[is_prompt] = input_ids[attention_mask.bool()]
    return prompt_ids, is_prompt


class DiffusionLM(PreTrainedModel):
    """A saved DLM model for users of transformers alone: the Denoiser plus diffusion_generate."""

    config_class = DLMConfig
    base_model_prefix = "denoiser"  # so DLM's own model.safetensors, saved without it, loads as well

    def __init__(self, config):
        if config.lora_r:
            raise ValueError("this is a LoRA model: its folder holds adapters, not the base's weights; write a whole "
                             "model with DLM's --merge_lora, and load that")
        super().__init__(config)
        self.denoiser = Denoiser(config)
        self.post_init()

    def _init_weights(self, module):
        """Every weight comes from the checkpoint; nothing to initialise."""

    def forward(self, x_t, t, x0_cond, clean_ids=None, offset=0):
        return self.denoiser(x_t, t, x0_cond, clean_ids, offset)

    def diffusion_generate(self, input_ids=None, attention_mask=None, *, max_length=None, num_return_sequences=1,
                           steps=None, temperature=None, guidance_scale=None, callback=None, generator=None,
                           progress=False, **sampling):
        """Token ids (B * num_return_sequences, max_length): each prompt in input_ids (B, P) (with
        attention_mask, any padding left out; none: unconditional samples), followed by its
        completion and end-of-text padding. max_length (default: the trained window, config.max_len;
        at most Denoiser.longest) counts the prompt. steps (default: the model's own number), temperature,
        guidance_scale and any other field of SampleConfig in `sampling` say how to sample;
        callback(Step) runs after every denoising step; generator makes it repeatable."""
        window = self.config.max_len
        max_length = max_length or window
        if max_length > self.denoiser.longest:
            raise ValueError(f"max_length {max_length} is above the longest text this model samples "
                             f"({self.denoiser.longest} tokens)")
        if input_ids is None:
            input_ids = torch.zeros(1, 0, dtype=torch.long)
        rows = lambda a: None if a is None else a.to(self.device).repeat_interleave(num_return_sequences, 0)
        prompt_ids, is_prompt = prompt_window(rows(input_ids), rows(attention_mask), max(window, max_length),
                                              self.config.end_id)
        if (is_prompt.sum(1) >= max_length).any():
            raise ValueError(f"a prompt leaves no room for a new token within max_length {max_length}")
        given = dict(num_steps=steps, temperature=temperature, guidance_scale=guidance_scale, **sampling)
        cfg = SampleConfig(**{name: value for name, value in given.items() if value is not None})
        return sample(self.denoiser, prompt_ids, is_prompt, cfg, generator, callback, progress, max_length)

