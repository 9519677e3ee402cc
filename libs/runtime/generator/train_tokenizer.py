"""python -m duetserve.runtime.generator.train_tokenizer: retrain the committed BPE tokenizers.

Byte-level BPE as GPT-2 has it: the ByteLevel pre-tokenizer (GPT-2 regex, no prefix space), the
ByteLevel decoder, no normalizer and no post-processor. All 256 bytes are in the alphabet, so
`encode(text, add_special_tokens=False)` then `decode` gives back any UTF-8 text byte for byte,
and `encode(text, add_special_tokens=True)` adds nothing: BOS comes from the chat template.

The corpus is English text found locally: the licence texts under
/usr/share/common-licenses, then the docstrings and comments of the Python standard library,
files in sorted order, capped at `CORPUS_CAP_BYTES`. Training is deterministic (the BPE trainer
breaks ties between equally frequent pairs by their ids), so the same Python 3.11.7 standard
library and licence folder give the same JSON; `--check` retrains and compares with the committed
files. Other machines need not retrain: they use the committed files.
"""

import argparse
import ast
import hashlib
import io
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from duetserve.runtime.generator import assets

CORPUS_CAP_BYTES = 20_000_000
LICENSES_DIR = Path("/usr/share/common-licenses")


def stdlib_dir() -> Path:
    """The base interpreter's standard library (not the virtualenv's)."""
    return Path(sysconfig.get_paths(vars={"base": sys.base_prefix})["stdlib"])


def license_texts(directory: Path = LICENSES_DIR) -> Iterator[str]:
    """Each licence text, in sorted path order; links to the same text are read once."""
    if not directory.is_dir():
        return
    seen: set[Path] = set()
    for path in sorted(directory.iterdir()):
        real = path.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            yield real.read_text(encoding="utf-8", errors="replace")


def docs_and_comments(source: str) -> str:
    """The docstrings and comments of one Python file, blocks separated by blank lines.

    A file that does not parse gives nothing; one that stops tokenizing, the comments before."""
    blocks: list[str] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node, clean=True)
            if docstring:
                blocks.append(docstring)
    blocks.append("\n".join(_comments(source)))
    return "\n\n".join(block for block in blocks if block)


def _comments(source: str) -> Iterator[str]:
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                text = token.string.lstrip("#!").strip()
                if text:
                    yield text
    except (tokenize.TokenError, SyntaxError):
        return


def python_texts(root: Path) -> Iterator[str]:
    """docs_and_comments of every .py file under root outside site-packages, in sorted order."""
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    for path in paths:
        text = docs_and_comments(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            yield text


def build_corpus(cap_bytes: int = CORPUS_CAP_BYTES) -> list[str]:
    """Licences, then standard-library docs, stopping before the cap (UTF-8 bytes) is passed."""
    corpus: list[str] = []
    total = 0
    for text in _chain(license_texts(), python_texts(stdlib_dir())):
        size = len(text.encode("utf-8"))
        if total + size > cap_bytes:
            break
        corpus.append(text)
        total += size
    return corpus


def _chain(*sources: Iterable[str]) -> Iterator[str]:
    for source in sources:
        yield from source


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with our pipeline."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train(corpus: list[str], vocab_size: int) -> Tokenizer:
    """A tokenizer with exactly vocab_size ids: SPECIAL_TOKENS, then the 256 bytes, then merges."""
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(assets.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise RuntimeError(f"corpus too small: trained {got} ids, wanted {vocab_size}")
    return tokenizer


def to_json(tokenizer: Tokenizer) -> str:
    """The tokenizer.json text we commit (pretty, newline-terminated)."""
    return tokenizer.to_str(pretty=True) + "\n"


def corpus_digest(corpus: list[str]) -> str:
    """sha256 of the corpus, to tell whether two machines trained on the same text."""
    digest = hashlib.sha256()
    for text in corpus:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duetserve.runtime.generator.train_tokenizer")
    parser.add_argument("--out", type=Path, default=assets.TOKENIZER_DIR, help="output folder")
    parser.add_argument(
        "--check", action="store_true", help="compare with the files in --out instead of writing"
    )
    args = parser.parse_args(argv)
    corpus = build_corpus()
    size = sum(len(text.encode("utf-8")) for text in corpus)
    print(f"corpus: {len(corpus)} documents, {size} bytes, sha256 {corpus_digest(corpus)}")
    mismatches = 0
    for vocab_size in assets.VOCAB_SIZES:
        text = to_json(train(corpus, vocab_size))
        path = args.out / assets.tokenizer_json_path(vocab_size).name
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            mismatches += not same
            print(f"{path}: {'identical' if same else 'DIFFERENT'}")
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
