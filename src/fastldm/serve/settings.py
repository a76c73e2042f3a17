"""Settings: everything one server instance is configured with (the `fastldm serve` flags), as one frozen
object that `create_app` reads. Nothing here is process-global: two apps with different settings can run in
one process (the tests do)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SettingError
from ..plan import Limits
from ..runtime import memory_plan


@dataclass(frozen=True)
class Settings:
    model: Path | None = None               # served by default; None: the embedded RGBD model
    models_dir: Path | None = None          # diffusers folders and .safetensors files listed by name
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None              # Bearer KEY, or HTTP Basic with password KEY (or user:password = KEY)
    cors_origins: tuple[str, ...] = ()
    max_queue: int = 64                     # jobs waiting to start, all models together; more -> 429
    max_batch: int = 8                      # images denoised together per model (1: one request at a time)
    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 150
    max_n: int = 8
    max_prompt_chars: int = 4000
    max_body_bytes: int = 32 << 20          # request bodies (base64 init images); more -> 413
    model_memory: int | None = None         # bytes of loaded weights across models; None: half the RAM
    device: str = "cpu"
    dtype: str | None = None
    result_ttl_s: float = 600.0             # finished jobs of the jobs API are kept this long ...
    result_count: int = 64                  # ... and at most this many (oldest dropped first)
    threads: int | None = None              # torch CPU threads (configure_process), set by `serve` only
    memory: str | None = None               # each model's memory mode (fastldm.load; runtime/memory_plan.py)
    memory_budget: int | None = None        # each model's memory budget in bytes (requests over it: 507)

    @property
    def load_options(self) -> dict:
        """The keyword arguments of fastldm.load that these settings give (memory ones only when set)."""
        memory = {"memory": self.memory, "memory_budget": self.memory_budget}
        return {"device": self.device, "dtype": self.dtype, **{k: v for k, v in memory.items() if v is not None}}

    def __post_init__(self):
        for name in ("max_queue", "max_batch", "max_width", "max_height", "max_steps", "max_n",
                     "max_prompt_chars", "max_body_bytes", "result_count"):
            if getattr(self, name) < 1:
                raise SettingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.models_dir is not None and not Path(self.models_dir).is_dir():
            raise SettingError(f"models folder {self.models_dir} does not exist or is not a folder")

    @property
    def limits(self) -> Limits:
        """What one request may ask for on this server (checked by Pipeline.plan before it is queued)."""
        return Limits(max_steps=self.max_steps, max_n=self.max_n, max_side=max(self.max_width, self.max_height),
                      max_pixels=self.max_width * self.max_height, max_prompt_chars=self.max_prompt_chars)


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768); SettingError otherwise."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SettingError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1024x1024") from None
    if w < 8 or h < 8:
        raise SettingError(f"{text!r}: width and height must be at least 8")
    return w, h


def parse_bytes(text: str) -> int:
    """'8G', '512M', '1.5GB', '1000000' -> bytes (powers of 1024); SettingError otherwise."""
    return memory_plan.parse_bytes(text)
