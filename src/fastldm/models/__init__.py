from .clip import CLIPTextModel, TextEncoding
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

__all__ = ["CLIPTextModel", "TextEncoding", "UNet2DConditionModel", "AutoencoderKL"]
