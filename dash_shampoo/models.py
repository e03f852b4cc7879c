"""A Llama-style decoder-only language model, small enough to read in one sitting.

The architecture follows the paper's runs (``llm-baselines`` Llama, see the DASH reference §7):
pre-norm blocks with RMSNorm, rotary position embeddings on queries and keys, causal
self-attention, a SwiGLU MLP, an untied token embedding and output head, no biases, no dropout,
and weights drawn from N(0, 0.02²) (the two residual output projections of each block from
N(0, (0.02/sqrt(2·n_layer))²), as in GPT-2 and llm-baselines).

Named sizes (:data:`SIZES`) go from ``micro`` (for tests) and ``tiny`` (about one million parameters
with a byte vocabulary; trains in minutes on two CPU cores) to ``350m``. Each name means one model
everywhere: the trainer trains it and ``dash-shampoo bench`` takes its parameter shapes from it
(:func:`parameter_shapes`). A size's vocabulary is a default that the trainer's data replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model.

    Attributes:
        vocab_size: number of token ids the data can hold (rounded up to ``vocab_multiple`` for the
            embedding and head, so ids ``>= vocab_size`` are never produced by the data).
        d_model: width of the residual stream.
        n_layer: number of transformer blocks.
        n_head: attention heads (``d_model`` must be divisible by it).
        seq_len: longest sequence (the rotary tables are built for it).
        multiple_of: the SwiGLU hidden width ``8/3·d_model`` is rounded up to a multiple of this.
        vocab_multiple: the vocabulary is padded to a multiple of this (tidy matrix shapes).
        norm_eps: RMSNorm epsilon.
        rope_theta: rotary base.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    seq_len: int = 128
    multiple_of: int = 64
    vocab_multiple: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layer",
            "n_head",
            "seq_len",
            "multiple_of",
            "vocab_multiple",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"the head width d_model/n_head = {self.d_model // self.n_head} must be even for rotary "
                "embeddings"
            )

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and of the head: ``vocab_size`` rounded up to ``vocab_multiple``."""
        return _round_up(self.vocab_size, self.vocab_multiple)

    @property
    def hidden(self) -> int:
        """SwiGLU hidden width: ``8/3·d_model`` rounded up to ``multiple_of`` (Llama's rule)."""
        return _round_up(int(2 * 4 * self.d_model / 3), self.multiple_of)


#: Named model sizes. The vocabulary is the one the benchmarks use; the trainer replaces it with
#: its data's (and the sequence length and shape with its options).
SIZES: dict[str, ModelConfig] = {
    "micro": ModelConfig(vocab_size=512, d_model=64, n_layer=2, n_head=2, seq_len=128, multiple_of=64),
    "tiny": ModelConfig(d_model=128, n_layer=4, n_head=4, seq_len=128, multiple_of=64),
    "mini": ModelConfig(vocab_size=4096, d_model=256, n_layer=4, n_head=4, seq_len=256, multiple_of=256),
    "small": ModelConfig(vocab_size=32000, d_model=384, n_layer=6, n_head=6, seq_len=256, multiple_of=128),
    "124m": ModelConfig(vocab_size=32000, d_model=768, n_layer=12, n_head=12, seq_len=1024, multiple_of=256),
    "350m": ModelConfig(vocab_size=32000, d_model=1024, n_layer=24, n_head=16, seq_len=1024, multiple_of=256),
}


def model_config(size: str, **overrides: int | None) -> ModelConfig:
    """The named size ``size`` with the given fields replaced (``None`` values are ignored).

    Raises:
        ValueError: unknown size, or an override that makes an invalid shape.
    """
    if size not in SIZES:
        raise ValueError(f"--model must be one of {', '.join(SIZES)}; got {size!r}")
    return replace(SIZES[size], **{k: v for k, v in overrides.items() if v is not None})


def _round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dimension."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables of shape ``(seq_len, head_dim/2)`` for rotary embeddings."""
    frequencies = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), frequencies)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs ``(i, i + D/2)`` of ``x`` (..., T, D) by position-dependent angles.

    This is the "rotate half" pairing (GPT-NeoX, Hugging Face Llama); Meta's Llama pairs adjacent
    features instead, which is the same map up to a fixed permutation of the head features.
    """
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary queries and keys.

    The query, key and value projections are one ``(3·d, d)`` matrix ``wqkv`` (one matmul). Its
    rows are the three ``d × d`` matrices stacked, so with a DASH block size that divides ``d``
    they are preconditioned as three separate matrices, exactly as if they were kept apart.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        d = config.d_model
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.wqkv(x).view(batch, length, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(qkv[:2], cos, sin).unbind(0)  # (B, H, T, D/H) each
        y = F.scaled_dot_product_attention(q, k, qkv[2], is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(batch, length, width))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) ⊙ w3 x)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.hidden, bias=False)
        self.w3 = nn.Linear(config.d_model, config.hidden, bias=False)
        self.w2 = nn.Linear(config.hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """The decoder: embedding, ``n_layer`` blocks, a final RMSNorm and an untied output head."""

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None) -> None:
        """Build the model and initialise its weights from ``generator`` (a fresh one seeded 0 if None)."""
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.padded_vocab, bias=False)
        cos, sin = rotary_tables(config.d_model // config.n_head, config.seq_len, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if not self.head.weight.is_meta:  # a meta model has shapes only (parameter_shapes)
            self.reset_parameters(generator if generator is not None else torch.Generator().manual_seed(0))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """N(0, 0.02²) for every matrix, N(0, (0.02/sqrt(2·n_layer))²) for the residual outputs."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue  # RMSNorm weights keep their ones
            std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, padded_vocab)`` of ``tokens`` (B, T), or the mean cross-entropy if ``targets``."""
        length = tokens.shape[1]
        if length > self.config.seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's seq_len {self.config.seq_len}")
        x = self.embedding(tokens)
        cos, sin = self.cos[:length], self.sin[:length]
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def parameter_shapes(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter of ``Llama(config)`` in model order, built on the meta
    device (nothing is allocated, so the largest sizes cost nothing)."""
    with torch.device("meta"):
        model = Llama(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]
