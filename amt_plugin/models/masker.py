"""The masker: a small Transformer encoder that reads the unmasked tokens and gives one logit
per position. It knows nothing of budgets, specials or losses; `amt_plugin.masking` turns its
logits into a choice and the criterion trains it.

Attention goes through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on
GPUs). Blocks are pre-LayerNorm, so two layers train stably without warm-up of their own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UsageError
from . import cpu_dropout


class MaskerBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, embed_dim: int, ffn_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if embed_dim % heads != 0:
            raise UsageError(
                f"--masker-embed-dim {embed_dim} is not divisible by "
                f"--masker-attention-heads {heads}; pick a head count that divides it"
            )
        self.heads = heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(
            nn.Linear(embed_dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, embed_dim)
        )

    def forward(self, x: Tensor, attend: Tensor | None) -> Tensor:
        """x (B, T, C); attend (B, 1, 1, T) bool, True = may attend to that key (None: all)."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = cpu_dropout.attention(q, k, v, attend, p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + cpu_dropout.dropout(self.out(y), p, self.training)
        return x + cpu_dropout.dropout(self.ffn(self.ffn_norm(x)), p, self.training)


class Masker(nn.Module):
    """tokens (B, T) -> masker_logits (B, T): how much the masker wants each position masked.

    Own token and learned position embeddings, `layers` pre-LN blocks, a final LayerNorm and a
    linear head. The head starts at zero, so an untrained masker is exactly uniform: before it
    learns anything, learned masking *is* random masking.
    """

    def __init__(
        self,
        vocab_size: int,
        padding_idx: int,
        max_positions: int,
        embed_dim: int,
        ffn_dim: int,
        layers: int,
        heads: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self.embed_tokens = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.embed_positions = nn.Embedding(max_positions, embed_dim)
        self.layers = nn.ModuleList(
            MaskerBlock(embed_dim, ffn_dim, heads, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, 1)
        # The criterion's fallback baseline for its policy gradient: a running mean of past
        # rewards, a scalar tensor on the device (None or NaN before the first acting batch).
        # Kept here, outside the parameters and buffers, so that it stays fp32 whatever the
        # masker's dtype and travels in checkpoints (see get_extra_state): a resumed run
        # continues with the same baseline.
        self.reward_mean: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embed_tokens.weight[self.padding_idx].zero_()
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: Tensor, padded: bool | None = None) -> Tensor:
        """padded=False promises a batch without padding: attention then runs without a mask
        (flash attention on GPUs). None checks nothing and always masks the padding."""
        B, T = tokens.shape
        if T > self.embed_positions.num_embeddings:
            raise UsageError(
                f"sequence of {T} tokens is longer than the masker's "
                f"{self.embed_positions.num_embeddings} positions; raise --max-positions"
            )
        # keys that are not padding
        attend = None if padded is False else tokens.ne(self.padding_idx).view(B, 1, 1, T)
        positions = torch.arange(T, device=tokens.device)
        x = self.embed_tokens(tokens) + self.embed_positions(positions)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, attend)
        return self.head(self.norm(x)).squeeze(-1)  # (B, T)

    def get_extra_state(self) -> Tensor:
        """Saved under `masker._extra_state`: the running reward mean as an fp32 tensor of
        one element, or of none before there is one (NaN stands for none on the device);
        a tensor, so that checkpoint tools handle it like the weights."""
        if self.reward_mean is None or not torch.isfinite(self.reward_mean).all():
            return torch.zeros(0)
        return self.reward_mean.detach().float().reshape(1)

    def set_extra_state(self, state: Tensor) -> None:
        self.reward_mean = state.to(self.head.weight.device, torch.float32).reshape(()) \
            if state.numel() else None

    def upgrade_state_dict_named(self, state_dict: dict, name: str) -> None:
        """Checkpoints from before the running mean was saved: it starts afresh."""
        state_dict.setdefault(f"{name}._extra_state" if name else "_extra_state",
                              torch.zeros(0))
