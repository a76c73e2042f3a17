"""CLIP text transformer (Radford et al. 2021, §2.4): OpenAI CLIP-L (SD1, SDXL), OpenCLIP ViT-H (SD2)
and ViT-bigG with its projection (SDXL). Names follow transformers' CLIPTextModel(WithProjection).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..config import CLIPConfig


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.heads, C // self.heads).transpose(1, 2)  # (B, H, N, D)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = ops.attention(q, k, v, causal=True)  # (B, H, N, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.approximate = {"quick_gelu": "quick", "gelu": "none", "gelu_new": "tanh"}[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ops.gelu(self.fc1(x), self.approximate))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


@dataclass
class TextEncoding:
    hidden: torch.Tensor         # (B, N, C): last layer after final LayerNorm, or the requested layer's output
    pooled: torch.Tensor         # (B, C) or (B, P) when projected: the EOS token of the final, normed layer


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = (nn.Linear(config.hidden_size, config.projection_dim, bias=False)
                                if config.projection_dim else None)

    def forward(self, input_ids: torch.Tensor, layer: int = -1) -> TextEncoding:
        """input_ids (B, N) -> TextEncoding. `layer=-1`: last hidden state with the final LayerNorm (SD1/SD2);
        `layer=-2`: the penultimate layer's raw output (SDXL, A1111 "clip skip 2")."""
        tm, N = self.text_model, input_ids.shape[1]
        pos = torch.arange(N, device=input_ids.device)
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding(pos)[None]
        n_layers = len(tm.encoder.layers)
        for i, block in enumerate(tm.encoder.layers):
            x = block(x)
            if i == n_layers + layer:
                chosen = x
        last = tm.final_layer_norm(x)
        hidden = last if layer == -1 else chosen
        # The pooled token is the first EOS; legacy configs (eos_token_id 2) use the largest id instead.
        if self.config.eos_token_id == 2:
            eos = input_ids.argmax(dim=-1)
        else:
            eos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]  # (B, C)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return TextEncoding(hidden, pooled)
