"""Models shipped inside the package. ``default/`` holds the embedded default model
(a Hugging Face checkpoint directory plus the Offramp exits file) once it is trained."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"


def default_model_dir() -> Path | None:
    """The embedded model's directory, or None while it has not been trained/committed."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").is_file() else None
