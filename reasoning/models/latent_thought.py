"""Latent Thought Model (Kong et al., 2025): a decoder that cross-attends to latent thought vectors z.

z = (z_1, …, z_L) holds one group of `latents_per_layer` vectors of size `latent_dim` per decoder
layer, `latents [B, L, n, d]`, with the fixed prior p(z) = N(0, I). Every block is pre-norm:

    x ← x + SelfAttn(norm₁ x)            causal, optionally restricted to a sliding window
    x ← x + CrossAttn(norm₂ x, z_l)      queries from the tokens, keys/values from z_l, no mask
    x ← x + MLP(norm₃ x)                 SwiGLU

so p_β(x|z) = Π_t p_β(x_t | x_<t, z) is an ordinary autoregressive model given z. The model does
not infer z: `reasoning.models.latent_inference.fit_posterior` fits q(z|x) = N(μ, diag σ²) per
sequence, and decoding uses `model.generate(input_ids, latents=z, ...)`.

Choices made here (see `docs/methods/latent_thought.md`): self-attention positions are RoPE (default)
or learned absolute embeddings; the keys of z carry no position (the reference code gives them
RoPE positions spread over the sequence); with `sliding_window = W` a token attends to itself
and the W − 1 tokens before it, so information from further back can only arrive through z.
`latents=None` means z = 0, the prior mean. Importing this module registers the config and model
with `AutoConfig` / `AutoModelForCausalLM`, so `AutoModelForCausalLM.from_pretrained(path)` loads
a saved checkpoint afterwards.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from reasoning.models.tiny import build_char_tokenizer, save_checkpoint

POSITION_EMBEDDINGS = ("rope", "learned")


class LatentThoughtConfig(PretrainedConfig):
    """Shape of a latent-thought decoder.

    Args:
        vocab_size: number of token ids (258 for `reasoning.models.tiny.build_char_tokenizer`).
        hidden_size, num_layers, num_heads, intermediate_size: decoder shape (head_dim =
            hidden_size / num_heads; intermediate_size defaults to 4 × hidden_size).
        latents_per_layer: n, the number of latent vectors each layer cross-attends to.
        latent_dim: d, the size of one latent vector (default: hidden_size).
        max_position_embeddings: longest sequence (size of the learned position table).
        sliding_window: W, or None for full causal self-attention.
        position_embedding: "rope" or "learned".
        rope_theta: RoPE base.
        rms_norm_eps, initializer_range: RMSNorm epsilon, std of the normal weight initialisation.
        tie_word_embeddings: share the input embedding and the LM head.
    """

    model_type = "latent_thought"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    def __init__(
        self,
        vocab_size: int = 258,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int | None = None,
        latents_per_layer: int = 8,
        latent_dim: int | None = None,
        max_position_embeddings: int = 1024,
        sliding_window: int | None = None,
        position_embedding: str = "rope",
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = None,
        eos_token_id: int | None = 1,
        **kwargs: Any,
    ) -> None:
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        if (hidden_size // num_heads) % 2 and position_embedding == "rope":
            raise ValueError("RoPE needs an even head dimension (hidden_size / num_heads)")
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {position_embedding!r}"
            )
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(
                f"sliding_window must be a positive number of tokens or None, got {sliding_window}"
            )
        if latents_per_layer < 1:
            raise ValueError(f"latents_per_layer must be at least 1, got {latents_per_layer}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.latents_per_layer = latents_per_layer
        self.latent_dim = latent_dim if latent_dim is not None else hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.sliding_window = sliding_window
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        self.tie_word_embeddings = tie_word_embeddings

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(L, n, d): the shape of z for one sequence."""
        return (self.num_layers, self.latents_per_layer, self.latent_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin `[B, 1, T, head_dim]` for integer `positions [B, T]` (computed on the fly: no buffers)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def self_attention_mask(
    padding: torch.Tensor, query_start: int, num_queries: int, num_keys: int, window: int | None
) -> torch.Tensor:
    """Boolean mask `[B, 1, T, K]` (True = attend) for queries at indices query_start … query_start+T−1.

    `padding [B, S]` is the 2-D attention mask over all S = query_start + T indices; the K keys are
    the last K of them (a sliding-window cache may have dropped older ones). Query i sees key j when
    j ≤ i, i − j < W (with a window W) and key j is not padding; it always sees itself, so rows of
    padding queries are never empty (no NaN from softmax over nothing).
    """
    end = query_start + num_queries
    query = torch.arange(query_start, end, device=padding.device)[:, None]
    key = torch.arange(end - num_keys, end, device=padding.device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed = allowed & (query - key < window)
    keep = padding[:, end - num_keys : end].bool()[:, None, None, :]
    return (allowed[None, None] & keep) | (key == query)[None, None]


class SwiGLU(nn.Module):
    def __init__(self, config: LatentThoughtConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SelfAttention(nn.Module):
    """Causal multi-head self-attention (optional sliding window, optional RoPE), KV cache aware."""

    def __init__(self, config: LatentThoughtConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.window = config.sliding_window
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, padding, query_start, rope, cache):
        batch, length, _ = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        mask = self_attention_mask(padding, query_start, length, k.shape[-2], self.window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class CrossAttention(nn.Module):
    """Multi-head attention from the tokens to one layer's latent vectors z_l `[B, n, d]` (no mask)."""

    def __init__(self, config: LatentThoughtConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.latent_dim, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.latent_dim, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(z).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(z).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class LatentThoughtBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to z_l, MLP, each with a residual."""

    def __init__(self, config: LatentThoughtConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = SelfAttention(config, layer_idx)
        self.cross_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn = CrossAttention(config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, z, padding, query_start, rope, cache):
        x = x + self.self_attn(self.self_norm(x), padding, query_start, rope, cache)
        x = x + self.cross_attn(self.cross_norm(x), z)
        return x + self.mlp(self.mlp_norm(x))


class LatentThoughtPreTrainedModel(PreTrainedModel):
    config_class = LatentThoughtConfig
    config: LatentThoughtConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LatentThoughtBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True


class LatentThoughtModel(LatentThoughtPreTrainedModel):
    """The decoder stack without the LM head; returns final (normalised) hidden states."""

    def __init__(self, config: LatentThoughtConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(LatentThoughtBlock(config, i) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def check_latents(self, latents: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        """z as `[B, L, n, d]` in the model's dtype: zeros (the prior mean) when None; batch 1 broadcasts."""
        shape = self.config.latent_shape
        if latents is None:
            return torch.zeros((batch, *shape), device=like.device, dtype=like.dtype)
        if tuple(latents.shape[1:]) != shape or latents.shape[0] not in (1, batch):
            raise ValueError(
                f"latents must have shape [B, L, n, d] = [{batch}, {', '.join(map(str, shape))}], "
                f"got {list(latents.shape)}"
            )
        return latents.to(device=like.device, dtype=like.dtype).expand(batch, *shape)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, DynamicCache | None, tuple[torch.Tensor, ...] | None]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length, _ = x.shape
        if use_cache is None:
            use_cache = past_key_values is not None
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=x.device)
        elif attention_mask.shape[1] != past + length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions, expected {past} cached + {length} new"
            )
        if position_ids is None:
            # Positions count real tokens only, so left padding does not shift learned positions.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        rope = None
        if self.config.position_embedding == "learned":
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(
                    f"sequence longer than max_position_embeddings={self.config.max_position_embeddings}"
                )
            x = x + self.embed_positions(position_ids)
        else:
            rope = _rope(
                position_ids,
                self.config.hidden_size // self.config.num_heads,
                self.config.rope_theta,
                x.dtype,
            )
        z = self.check_latents(latents, batch, x)
        hidden_states = [x] if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            x = layer(x, z[:, index], attention_mask, past, rope, cache)
            if hidden_states is not None and index < len(self.layers) - 1:
                hidden_states.append(x)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x, cache, tuple(hidden_states) if hidden_states is not None else None


class LatentThoughtForCausalLM(LatentThoughtPreTrainedModel, GenerationMixin):
    """p_β(x|z): the latent-thought decoder with an LM head; `generate(..., latents=z)` decodes given z."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LatentThoughtConfig) -> None:
        super().__init__(config)
        self.model = LatentThoughtModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of p_β(x_t | x_<t, z).

        `input_ids [B, T]`, `attention_mask [B, past + T]` (1 = token, 0 = padding), `latents [B, L, n, d]`
        (None: z = 0), `labels [B, T]` (−100 = ignored; shifted inside: logits at t score labels at
        t+1) -> `logits [B, T, V]` (the last `logits_to_keep` positions if > 0) and the mean token
        cross-entropy as `loss`. A cache is used and returned when `use_cache` is true or
        `past_key_values` is given (`generate` does both); otherwise nothing is cached.
        """
        hidden, cache, hidden_states = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            latents=latents,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=bool(output_hidden_states),
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=cache, hidden_states=hidden_states
        )

    def prepare_inputs_for_generation(self, input_ids, latents=None, **kwargs):
        """The default preparation (cache slicing, masks), with z passed through unchanged at every step."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        model_inputs["latents"] = latents
        return model_inputs


def build_latent_thought_model(
    vocab_size: int = 258, seed: int = 0, **config: Any
) -> LatentThoughtForCausalLM:
    """A randomly initialised model (seeded without disturbing the global RNG); `config` overrides the
    `LatentThoughtConfig` fields, e.g. `hidden_size=64, num_layers=2, num_heads=2`."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LatentThoughtForCausalLM(LatentThoughtConfig(vocab_size=vocab_size, **config))
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.do_sample = False
    return model


# Fields a recipe may set under `model.latent_thought:`; the vocabulary and special ids come from
# the tokenizer, the rest are LatentThoughtConfig's own.
RECIPE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "latents_per_layer",
    "latent_dim",
    "max_position_embeddings",
    "sliding_window",
    "position_embedding",
    "rope_theta",
    "rms_norm_eps",
    "initializer_range",
    "tie_word_embeddings",
)


def build_latent_thought_checkpoint(
    path: str | Path | None = None, seed: int = 0, **config: Any
) -> tuple[LatentThoughtForCausalLM, Any]:
    """A fresh model for the character tokenizer of `reasoning.models.tiny` (vocabulary, pad and EOS
    ids taken from it), saved with the tokenizer to `path` if given, like `build_tiny_model`.
    `config` holds `LatentThoughtConfig` fields (`RECIPE_FIELDS`); an unknown one is a ValueError."""
    unknown = sorted(set(config) - set(RECIPE_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown latent-thought model field(s) {unknown}; valid: {', '.join(RECIPE_FIELDS)}"
        )
    tokenizer = build_char_tokenizer(model_max_length=config.get("max_position_embeddings", 1024))
    model = build_latent_thought_model(
        vocab_size=len(tokenizer),
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config,
    )
    if path is not None:
        save_checkpoint(model, tokenizer, path)
    return model, tokenizer


def latent_size(config: LatentThoughtConfig) -> int:
    """Number of latent coordinates per sequence, L · n · d."""
    return math.prod(config.latent_shape)


AutoConfig.register(LatentThoughtConfig.model_type, LatentThoughtConfig, exist_ok=True)
AutoModelForCausalLM.register(LatentThoughtConfig, LatentThoughtForCausalLM, exist_ok=True)
