"""AutoencoderKL (Rombach et al. 2022, §3; Esser et al. 2021's first stage), incl. the LDM3D RGB-D variants.

Encoder: image (B, Cimg, H, W) in [-1, 1] -> diagonal Gaussian over latents (B, Clat, H/f, W/f).
Decoder: latents -> image. `scaling_factor` / `shift_factor` map between VAE latents and the latents the
UNet sees: z_unet = (z - shift) * scale. Parameter names follow diffusers' AutoencoderKL.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import VAEConfig
from .layers import Attention, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

_EPS = 1e-6


class VAEAttention(Attention):
    """Single-head self-attention over the pixels of a feature map, with its own GroupNorm and residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__(ch, heads=1, qkv_bias=True)
        self.group_norm = GroupNorm(groups, ch, eps=_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, groups, _EPS, None) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, groups, _EPS, None)
                                      for i in range(n)])
        self.downsamplers = nn.ModuleList([Downsample2D(cout, pad_asym=True)] if down else [])

    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *self.downsamplers]


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, groups, _EPS, None)
                                      for i in range(n)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)] if up else [])

    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *self.upsamplers]


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [EncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS, act="silu")
        self.conv_out = Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for layer in _layers(self.down_blocks):
            x = layer(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels[::-1], c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [DecoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, i < n - 1) for i in range(n)])
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS, act="silu")
        self.conv_out = Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for layer in _layers(self.up_blocks):
            x = layer(x)
        return self.conv_out(self.conv_norm_out(x))


def _layers(blocks: nn.ModuleList) -> list[nn.Module]:
    """The blocks' layers in order, run one by one rather than block by block: a block called as a module
    would have its input held by the calling frames until the block ends, long after its first layer
    has read it (the upsampled 512² input of the last decoder block is 256 MiB)."""
    return [layer for block in blocks for layer in block.layers()]


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        c = self.config = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = Conv2d(c.latent_channels, c.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, Cimg, H, W) in [-1, 1] -> (mean, logvar), each (B, Clat, H/f, W/f), in VAE latent units."""
        moments = self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Clat, h, w) in VAE latent units -> image (B, Cimg, 8h, 8w), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def to_unet_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def from_unet_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor + (self.config.shift_factor or 0.0)
