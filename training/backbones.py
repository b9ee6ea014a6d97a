"""The two FAR backbones: known tokens (+ class) -> condition vector z per token.

- `MaskedBackbone`: MAR's bidirectional encoder-decoder with MAR's parameter names.
  MAR drops masked tokens with a data-dependent `nonzero` gather; here `forward` keeps
  every position in the encoder and masks the keys instead, and `forward_known` (the
  exported encoder variants) gathers a static number of known-token slots given as an
  index input: both give MAR's outputs with static shapes (tests/test_backbones.py).
- `CausalBackbone`: GPT-style, raster order after a class token, with a static-size
  KV cache for sampling (position is an input; the exported step reads the cache and writes every
  block's new row into a new one in one torch.where, the eager step writes in place).

Exported (`training.layers.exporting`), attention computes q, k and v as three products, the form
ONNX Runtime runs without a transpose-and-split copy; eager PyTorch keeps the one fused qkv product.

Shapes: B batch, L tokens, C token channels, D width, H heads, T sequence with buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import FARConfig
from training.layers import GELU, LayerNorm, exporting, softmax32

NEG = -1e9  # additive mask value; softmax runs in fp32, so this never overflows

# ----------------------------------------------------------------------------
# Transformer block (timm's Block names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)
# ----------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _project(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """q, k or v (i = 0, 1, 2) alone, from its rows of the qkv weight: x (B, T, D) -> (B, H, T, hd)."""
        B, T, D = x.shape
        w, b = self.qkv.weight[i * D : (i + 1) * D], self.qkv.bias[i * D : (i + 1) * D]
        return F.linear(x, w, b).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if exporting():
            # three products, each split into heads on its own: ONNX Runtime folds those transposes into the
            # attention MatMuls (the fused form's (B, T, 3, H, hd) transpose and split are two copies)
            return self._project(x, 0), self._project(x, 1), self._project(x, 2)
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (B, H, T, hd)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q = q * self.head_dim**-0.5
        attn = softmax32((q @ k.transpose(-2, -1)).float() + bias)  # (B, H, Tq, Tk)
        out = self.attn_drop(attn.to(v.dtype)) @ v  # (B, H, Tq, hd)
        B, H, T, hd = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, H * hd)))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """bias: additive fp32 mask broadcastable to (B, H, T, T). rows (B, Q) int64: the output at those
        rows only (B, Q, D): queries from them, keys and values from every row."""
        if rows is None:
            q, k, v = self._qkv(x)
        elif exporting():
            q, k, v = self._project(gather_rows(x, rows), 0), self._project(x, 1), self._project(x, 2)
        else:
            B, T, D = x.shape
            H, hd = self.num_heads, self.head_dim
            w, b = self.qkv.weight, self.qkv.bias  # (3D, D): the q, k and v rows, in that order
            q = self._project(gather_rows(x, rows), 0)
            kv = F.linear(x, w[D:], b[D:]).reshape(B, T, 2, H, hd).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]
        return self._attend(q, k, v, bias)

    def forward_cached(
        self, x: torch.Tensor, bias: torch.Tensor | None, kv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new position. x (B, 1, D); bias (1, 1, 1, L): 0 on the cached positions before the new one,
        NEG elsewhere, or None when kv holds only those; kv (2, B, H, L, hd) the cache, only read ->
        output (B, 1, D), the new position's keys and values (2, B, H, 1, hd). The new position attends
        to the cache and to itself without writing itself into a copy of the cache first."""
        q, k, v = self._qkv(x)  # (B, H, 1, hd)
        q = q * self.head_dim**-0.5
        past = (q @ kv[0].transpose(-2, -1)).float()  # (B, H, 1, L) the cache
        logits = torch.cat(
            [past if bias is None else past + bias, (q * k).sum(-1, keepdim=True).float()], dim=-1
        )  # (B, H, 1, 1) itself
        attn = self.attn_drop(softmax32(logits).to(v.dtype))  # (B, H, 1, L + 1)
        L = kv.shape[-2]
        out = attn[..., :L] @ kv[1] + attn[..., L:] * v  # (B, H, 1, hd)
        B, H, T, hd = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, H * hd))), torch.stack([k, v])


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), rows (B, Q) int64 -> (B, Q, D)."""
    return torch.gather(x, 1, rows[:, :, None].expand(-1, -1, x.shape[-1]))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """rows (B, Q) int64: the block's output at those rows only (B, Q, D); every row is a key."""
        h = self.attn(self.norm1(x), bias, rows)
        x = (x if rows is None else gather_rows(x, rows)) + h
        return x + self.mlp(self.norm2(x))

    def forward_cached(self, x, bias, kv):
        h, new_kv = self.attn.forward_cached(self.norm1(x), bias, kv)
        x = x + h
        return x + self.mlp(self.norm2(x)), new_kv


def _blocks(cfg: FARConfig, depth: int) -> nn.ModuleList:
    return nn.ModuleList(
        Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
        for _ in range(depth)
    )


def _init_weights(module: nn.Module) -> None:
    """MAR's init: xavier-uniform linears, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ClassEmbedding(nn.Module):
    """Shared by both backbones: a class embedding and MAR's learned null class `fake_latent`."""

    def _init_class(self, cfg: FARConfig) -> None:
        self.class_emb = nn.Embedding(cfg.num_classes, cfg.width)
        self.fake_latent = nn.Parameter(torch.zeros(1, cfg.width))

    def class_vector(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """labels (B,) -> (B, D); rows where `drop` is True get the null class (CFG / class dropout)."""
        emb = self.class_emb(labels)
        if drop is None:
            return emb
        return torch.where(drop[:, None], self.fake_latent.to(emb.dtype).expand_as(emb), emb)

    def null_vector(self, batch: int) -> torch.Tensor:
        return self.fake_latent.expand(batch, -1)


# ----------------------------------------------------------------------------
# Masked (MAR) backbone
# ----------------------------------------------------------------------------


class MaskedBackbone(_ClassEmbedding):
    def __init__(self, cfg: FARConfig):
        super().__init__()
        self.cfg = cfg
        L, D, buf = cfg.seq_len, cfg.width, cfg.buffer_size
        self.buffer_size = buf
        self._init_class(cfg)
        self.z_proj = nn.Linear(cfg.token_dim, D)
        self.z_proj_ln = LayerNorm(D, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L + buf, D))
        self.encoder_blocks = _blocks(cfg, cfg.enc_depth)
        self.encoder_norm = LayerNorm(D, eps=1e-6)
        self.decoder_embed = nn.Linear(D, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L + buf, D))
        self.decoder_blocks = _blocks(cfg, cfg.dec_depth)
        self.decoder_norm = LayerNorm(D, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        _init_weights(self)
        for p in (
            self.class_emb.weight,
            self.fake_latent,
            self.mask_token,
            self.encoder_pos_embed_learned,
            self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned,
        ):
            nn.init.normal_(p, std=0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        class_vec: torch.Tensor,
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, L, C); mask (B, L) 1 = unknown; class_vec (B, D) -> z (B, L, D) for every position, or
        with query (B, Q) int64 for those positions only (B, Q, D)."""
        B = tokens.shape[0]
        buf = self.buffer_size
        known = torch.cat([torch.ones_like(mask[:, :1]).expand(B, buf), 1 - mask], dim=1)  # (B, T)
        # encoder: every position, unknown tokens hidden as keys
        x = self._encode(self.z_proj(tokens), self.encoder_pos_embed_learned, class_vec, known)  # (B, T, D)
        # decoder: unknown positions become the mask token
        return self._decode(torch.where(known[:, :, None] > 0.5, x, self.mask_token.to(x.dtype)), query)

    def forward_known(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        class_vec: torch.Tensor,
        known: torch.Tensor,
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward` with the encoder run on the buffer and c gathered slots only, as MAR's encoder drops
        unknown tokens, but with static shapes. known (B, c) int64: the positions of every known token
        (mask 0), padded with unknown positions (mask 1), which are invalid slots. Same z as `forward`, and
        with `query` the same rows."""
        B, L, C = tokens.shape
        buf = self.buffer_size
        valid = 1 - torch.gather(mask, 1, known)  # (B, c): 0 on the pads
        x = self.z_proj(torch.gather(tokens, 1, known[:, :, None].expand(-1, -1, C)))  # (B, c, D)
        pos = self.encoder_pos_embed_learned[0]  # (T, D)
        pos = torch.cat([pos[:buf].expand(B, -1, -1), pos[buf + known]], dim=1)  # (B, buf + c, D)
        buffer = torch.ones(B, buf, dtype=valid.dtype, device=valid.device)
        keys = torch.cat([buffer, valid], dim=1)  # (B, buf + c); c may be 0 (the first step)
        x = self._encode(x, pos, class_vec, keys)  # (B, buf + c, D)
        # slots back at their L positions: a one-hot product (exact, pads weigh 0), mask token elsewhere
        onehot = (known[:, :, None] == torch.arange(L, device=known.device)).to(x.dtype)  # (B, c, L)
        onehot = onehot * valid[:, :, None].to(x.dtype)
        rows = torch.einsum("bcl,bcd->bld", onehot, x[:, buf:])  # (B, L, D)
        written = onehot.sum(1)[:, :, None] > 0.5  # (B, L, 1)
        rows = torch.where(written, rows, self.mask_token.to(x.dtype))
        return self._decode(torch.cat([x[:, :buf], rows], dim=1), query)

    def _encode(
        self, x: torch.Tensor, pos: torch.Tensor, class_vec: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        """x (B, n, D) projected tokens; pos (B or 1, buf + n, D); keys (B, buf + n) 1 = a key, 0 = hidden
        -> (B, buf + n, D) in the decoder's width. The buffer slots hold the class vector."""
        B, buf = x.shape[0], self.buffer_size
        x = torch.cat([class_vec[:, None, :].expand(B, buf, -1).to(x.dtype), x], dim=1)  # (B, buf + n, D)
        x = self.z_proj_ln(x + pos)
        key_bias = ((1 - keys.float()) * NEG)[:, None, None, :]  # (B, 1, 1, T), fp32: -1e9 overflows fp16
        for blk in self.encoder_blocks:
            x = blk(x, key_bias)
        return self.decoder_embed(self.encoder_norm(x))

    def _decode(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) the decoder's input (mask token at unknown positions) -> z (B, L, D); everything
        attends to everything. With query (B, Q) int64 positions: z at those only (B, Q, D), and the last
        block computes its queries, MLP and output on those rows alone (MAR's decoder runs them on all)."""
        x = x + self.decoder_pos_embed_learned
        no_bias = torch.zeros(1, 1, 1, 1, device=x.device)
        *body, last = self.decoder_blocks  # dec_depth >= 1 (FARConfig checks it)
        for blk in body:
            x = blk(x, no_bias)
        pos = self.diffusion_pos_embed_learned
        if query is None:
            return self.decoder_norm(last(x, no_bias))[:, self.buffer_size :] + pos  # (B, L, D)
        x = last(x, no_bias, query + self.buffer_size)  # (B, Q, D)
        return self.decoder_norm(x) + pos[0][query]


# ----------------------------------------------------------------------------
# Causal (GPT-style) backbone
# ----------------------------------------------------------------------------


class CausalBackbone(_ClassEmbedding):
    """Position 0 holds the class vector, position i > 0 token i-1; the output at position i
    conditions token i. Uses enc_depth + dec_depth blocks."""

    def __init__(self, cfg: FARConfig):
        super().__init__()
        self.cfg = cfg
        L, D = cfg.seq_len, cfg.width
        self._init_class(cfg)
        self.z_proj = nn.Linear(cfg.token_dim, D)
        self.z_proj_ln = LayerNorm(D, eps=1e-6)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.blocks = _blocks(cfg, cfg.depth)
        self.norm = LayerNorm(D, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.register_buffer("causal_bias", torch.triu(torch.full((L, L), NEG), diagonal=1), persistent=False)
        _init_weights(self)
        for p in (
            self.class_emb.weight,
            self.fake_latent,
            self.pos_embed_learned,
            self.diffusion_pos_embed_learned,
        ):
            nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor, class_vec: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens (B, L, C), class_vec (B, D) -> z (B, L, D)."""
        x = torch.cat(
            [class_vec[:, None, :].to(tokens.dtype), self.z_proj(tokens[:, :-1])], dim=1
        )  # (B, L, D)
        x = self.z_proj_ln(x + self.pos_embed_learned)
        for blk in self.blocks:
            x = blk(x, self.causal_bias)
        return self.norm(x) + self.diffusion_pos_embed_learned

    def cache_shape(self, batch: int) -> tuple[int, ...]:
        """KV cache of all layers: (depth, 2, B, H, L, hd)."""
        c = self.cfg
        return (c.depth, 2, batch, c.num_heads, c.seq_len, c.head_dim)

    def forward_step(
        self,
        prev_token: torch.Tensor,
        pos: torch.Tensor,
        class_vec: torch.Tensor,
        cache: torch.Tensor,
        inplace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One position. prev_token (B, C) (ignored at pos 0); pos () int64; class_vec (B, D);
        cache (depth, 2, B, H, L, hd) -> z (B, D) for token `pos`, updated cache.

        The exported graph (default) reads the whole static cache under a bias and returns a new cache
        with the position's row written. `inplace` is the eager form (reference sampler, benchmarks):
        attention reads only the cached prefix and the row is written into `cache` itself, which is
        returned (no copy of the cache per step)."""
        L = self.cfg.seq_len
        slots = torch.arange(L, device=pos.device)
        onehot = (slots == pos).to(self.pos_embed_learned.dtype)  # (L,)
        x = torch.where(pos == 0, class_vec.to(prev_token.dtype), self.z_proj(prev_token))[
            :, None
        ]  # (B, 1, D)
        x = self.z_proj_ln(x + (onehot @ self.pos_embed_learned[0])[None, None])
        if inplace:
            n = int(pos)
            past, bias = cache[..., :n, :], None  # the cached prefix only
        else:
            bias = torch.where(slots < pos, 0.0, NEG)[None, None, None, :].float()  # (1, 1, 1, L)
            past = cache
        rows = []  # per block the new position's (2, B, H, 1, hd): the cache itself is only read
        for i, blk in enumerate(self.blocks):
            x, kv = blk.forward_cached(x, bias, past[i])
            rows.append(kv)
        z = self.norm(x[:, 0]) + onehot @ self.diffusion_pos_embed_learned[0]  # (B, D)
        if inplace:
            cache[..., n : n + 1, :] = torch.stack(rows)
            return z, cache
        # one pass over the cache: every block's new row into its slot
        write = (slots == pos)[None, None, None, None, :, None]  # (1, 1, 1, 1, L, 1)
        return z, torch.where(write, torch.stack(rows), cache)


def build_backbone(cfg: FARConfig) -> MaskedBackbone | CausalBackbone:
    return MaskedBackbone(cfg) if cfg.backbone == "masked" else CausalBackbone(cfg)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
