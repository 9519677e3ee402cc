"""The fixed workload for reuse of similar prompts (KVShare): a few documents that recur across
requests in different orders and positions, some with small edits, under a short question.

    python -m duetserve.loadtest.reuse_workload --write docs/bench/reuse_workload.json

Documents are ShareGPT answers of 256-512 tokens, questions ShareGPT prompts of 32-64 tokens
(by the served model's tokenizer); both held out from the length predictor's training pairs.
Each request takes 2-4 of the documents in a random order (so a document sits at another
position each time) and edits a quarter of them: a few words swapped for others of the same
document, as a template's fields or a revised draft differ. The file holds the documents, the
questions and each request's composition, fixed once (seed 0) and committed, so that every
measurement of reuse runs on the same prompts; `render` builds a request's prompt from it.
"""

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from duetserve.loadtest.autotune import token_counter
from duetserve.loadtest.length_train import held_out
from duetserve.loadtest.sharegpt import packaged_path, read_conversations
from duetserve.loadtest.text import CountTokens

DOC_TOKENS = (256, 512)
QUESTION_TOKENS = (32, 64)
DOCS_PER_REQUEST = (2, 4)
EDIT_SHARE = 0.25  # of the documents a request takes, edited
WORDS_EDITED = (1, 3)
HEAD = "Use the documents below to answer the question after them.\n\n"
_WORD = re.compile(r"[A-Za-z]{4,}")


@dataclass(frozen=True, slots=True)
class Placed:
    """One document in a request: which, and the words edited in it (position -> word)."""

    doc: int
    edits: dict[int, str]


@dataclass(frozen=True, slots=True)
class Composition:
    docs: list[Placed]
    question: int


@dataclass(frozen=True, slots=True)
class ReuseWorkload:
    docs: list[str]
    questions: list[str]
    requests: list[Composition]
    seed: int


def build(
    count: CountTokens, n_docs: int = 6, n_requests: int = 200, seed: int = 0
) -> ReuseWorkload:
    """The workload: `n_docs` documents, a question per request, `n_requests` compositions."""
    rng = np.random.default_rng(seed)
    pairs = read_conversations(packaged_path())
    docs: list[str] = []
    questions: list[str] = []
    for i in rng.permutation(len(pairs)):
        prompt, answer = pairs[int(i)]
        if not held_out(prompt.strip()):
            continue
        if len(docs) < n_docs and DOC_TOKENS[0] <= count(answer) <= DOC_TOKENS[1]:
            docs.append(answer)
        elif len(questions) < n_requests and (
            QUESTION_TOKENS[0] <= count(prompt) <= QUESTION_TOKENS[1]
        ):
            questions.append(prompt)
        if len(docs) == n_docs and len(questions) == n_requests:
            break
    if len(docs) < n_docs or len(questions) < n_requests:
        raise ValueError(f"only {len(docs)} documents and {len(questions)} questions found")
    requests = []
    for question in range(n_requests):
        k = int(rng.integers(DOCS_PER_REQUEST[0], DOCS_PER_REQUEST[1] + 1))
        placed = []
        for doc in rng.choice(n_docs, size=k, replace=False):
            edits: dict[int, str] = {}
            if rng.random() < EDIT_SHARE:
                words = _WORD.findall(docs[int(doc)])
                for _ in range(int(rng.integers(WORDS_EDITED[0], WORDS_EDITED[1] + 1))):
                    edits[int(rng.integers(len(words)))] = words[int(rng.integers(len(words)))]
            placed.append(Placed(int(doc), edits))
        requests.append(Composition(placed, question))
    return ReuseWorkload(docs, questions, requests, seed)


def edited(text: str, edits: dict[int, str]) -> str:
    """`text` with its n-th word (of 4 letters or more) replaced, for each n in `edits`."""
    if not edits:
        return text
    counter = iter(range(1 << 30))

    def swap(match: re.Match[str]) -> str:
        n = next(counter)
        return edits.get(n, match.group(0))

    return _WORD.sub(swap, text)


def render(workload: ReuseWorkload, index: int) -> str:
    """Request `index`'s prompt: the head, its documents in order (edited), its question."""
    request = workload.requests[index]
    parts = [
        f"Document {n + 1}:\n{edited(workload.docs[p.doc], p.edits)}"
        for n, p in enumerate(request.docs)
    ]
    question = workload.questions[request.question]
    return HEAD + "\n\n".join(parts) + f"\n\nQuestion: {question}"


def write(workload: ReuseWorkload, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(workload), indent=1, ensure_ascii=False) + "\n")


def read(path: Path) -> ReuseWorkload:
    data = json.loads(path.read_text())
    requests = [
        Composition(
            [Placed(p["doc"], {int(k): v for k, v in p["edits"].items()}) for p in r["docs"]],
            r["question"],
        )
        for r in data["requests"]
    ]
    return ReuseWorkload(data["docs"], data["questions"], requests, data["seed"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct"))
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, required=True)
    args = parser.parse_args(argv)
    workload = build(token_counter(args.model), args.docs, args.requests, args.seed)
    write(workload, args.write)
    edits = sum(bool(p.edits) for r in workload.requests for p in r.docs)
    placed = sum(len(r.docs) for r in workload.requests)
    print(
        f"{len(workload.docs)} documents, {len(workload.requests)} requests, {edits} of "
        f"{placed} placed documents edited: {args.write}"
    )


if __name__ == "__main__":
    main()
