"""The models a server offers, by name: the embedded RGBD model (always), `--model PATH`, and the diffusers
folders (a `model_index.json` inside) and `.safetensors` files directly in `--models-dir`.

A client names a model; the name is looked up in this listing and nothing else, so a name is never a path: a
name with a `/`, a `..` or any name not listed is an UnknownModel (404) and no file is opened for it. Lookup is
exact first, then case-insensitive (A1111 clients lower-case titles); the folder is re-read on each listing, so
files added while the server runs appear.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..api import EMBEDDED_MODEL
from ..errors import UnknownModel


@dataclass(frozen=True)
class ModelEntry:
    name: str          # what clients send: the folder name, or the file name without .safetensors
    path: Path         # never shown to clients
    file_name: str     # the folder or file name (A1111 `filename`, without its folder)

    @property
    def weights_bytes(self) -> int:
        """The size of the weights on disk: the estimate of what loading it takes before it is loaded."""
        files = self.path.rglob("*.safetensors") if self.path.is_dir() else [self.path]
        return sum(f.stat().st_size for f in files)


class ModelCatalog:
    def __init__(self, model: Path | None = None, models_dir: Path | None = None):
        self.default = _entry(Path(model).expanduser() if model is not None else EMBEDDED_MODEL)
        self.models_dir = None if models_dir is None else Path(models_dir).expanduser()

    def entries(self) -> list[ModelEntry]:
        """The default model first, then the embedded one, then the folder's models sorted by name."""
        found = [self.default, _entry(EMBEDDED_MODEL)]
        if self.models_dir is not None:
            for p in sorted(self.models_dir.iterdir()):
                if (p.is_dir() and (p / "model_index.json").is_file()) or (
                        p.is_file() and p.suffix == ".safetensors"):
                    found.append(_entry(p))
        unique: dict[str, ModelEntry] = {}
        for e in found:
            unique.setdefault(e.name, e)
        return list(unique.values())

    def resolve(self, name: str | None) -> ModelEntry:
        """The listed model called `name` (None or "": the default); UnknownModel otherwise."""
        if not name:
            return self.default
        entries = self.entries()
        for match in (lambda e: e.name == name or e.file_name == name,
                      lambda e: name.lower() in (e.name.lower(), e.file_name.lower())):
            hits = [e for e in entries if match(e)]
            if len(hits) == 1:
                return hits[0]
        raise UnknownModel(name, [e.name for e in entries])


def _entry(path: Path) -> ModelEntry:
    name = path.name.removesuffix(".safetensors") if path.is_file() else path.name
    return ModelEntry(name, path, path.name)
