"""Which HNSW library the semantic cache uses: hnswlib, usearch and faiss-cpu, measured here.

The cache's index holds unit vectors (384 floats) and ids, nothing else; entries come and go
all the time (TTL expiry, quotas, per-tenant namespaces), so a library must delete as well as
add and search. Each library gets the same vectors, the same graph settings (M=16,
efConstruction=200, efSearch=50: those of vLLM's semantic-router) and one thread, and is asked:

- add: seconds per vector while building an index of N;
- search: one query at a time (how the cache asks), p50/p99, for the nearest 4;
- recall@1 against an exact search (numpy), on queries that are near copies of stored vectors
  (paraphrases) and on queries drawn like the data (misses);
- churn: delete and add 10% of the entries, then search again (recall after churn);
- memory: the index's own size for N vectors.

Vectors: a mixture of 2,000 clusters (topics) with noise, normalised, so that neighbours are
as crowded as sentence embeddings' are; the seed is fixed.

    python -m duetserve.loadtest.ann_bench --sizes 10000 100000 --json docs/bench/ann.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

DIM = 384
M, EF_CONSTRUCTION, EF_SEARCH = 16, 200, 50


class Ann(Protocol):
    name: str

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...
    def search(self, vector: np.ndarray, k: int) -> np.ndarray: ...
    def remove(self, ids: np.ndarray) -> None: ...
    def nbytes(self) -> int: ...


class Hnswlib:
    name = "hnswlib"

    def __init__(self, capacity: int) -> None:
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=DIM)
        self.index.init_index(
            max_elements=capacity, ef_construction=EF_CONSTRUCTION, M=M, allow_replace_deleted=True
        )
        self.index.set_ef(EF_SEARCH)
        self.index.set_num_threads(1)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_items(vectors, ids, num_threads=1, replace_deleted=True)

    def search(self, vector: np.ndarray, k: int) -> np.ndarray:
        labels, _ = self.index.knn_query(vector, k=k, num_threads=1)
        return np.asarray(labels[0])

    def remove(self, ids: np.ndarray) -> None:
        for i in ids:
            self.index.mark_deleted(int(i))

    def nbytes(self) -> int:
        return int(self.index.index_file_size())


class Usearch:
    name = "usearch"

    def __init__(self, capacity: int) -> None:
        from usearch.index import Index

        self.index = Index(
            ndim=DIM,
            metric="ip",
            dtype="f32",
            connectivity=M,
            expansion_add=EF_CONSTRUCTION,
            expansion_search=EF_SEARCH,
        )
        del capacity  # usearch grows as it goes

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add(ids, vectors, threads=1)

    def search(self, vector: np.ndarray, k: int) -> np.ndarray:
        return np.asarray(self.index.search(vector, k, threads=1).keys)

    def remove(self, ids: np.ndarray) -> None:
        self.index.remove(ids)

    def nbytes(self) -> int:
        return int(self.index.memory_usage)


class Faiss:
    """faiss's HNSW cannot remove a vector (remove_ids raises for IndexHNSW): deletes are kept
    in a set and filtered from results, and the graph is rebuilt when a quarter is dead, the
    way a cache on it would have to."""

    name = "faiss"

    def __init__(self, capacity: int) -> None:
        import faiss

        faiss.omp_set_num_threads(1)
        self.faiss = faiss
        self.dead: set[int] = set()
        self.rows: dict[int, np.ndarray] = {}
        self._build()

    def _build(self) -> None:
        base = self.faiss.IndexHNSWFlat(DIM, M, self.faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = EF_CONSTRUCTION
        base.hnsw.efSearch = EF_SEARCH
        self.index = self.faiss.IndexIDMap(base)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids.astype(np.int64))
        for i, v in zip(ids, vectors, strict=True):
            self.rows[int(i)] = v
            self.dead.discard(int(i))

    def search(self, vector: np.ndarray, k: int) -> np.ndarray:
        _, labels = self.index.search(vector[None, :], k + len(self.dead) if self.dead else k)
        return np.asarray([i for i in labels[0] if i >= 0 and int(i) not in self.dead][:k])

    def remove(self, ids: np.ndarray) -> None:
        for i in ids:
            self.dead.add(int(i))
            self.rows.pop(int(i), None)
        if len(self.dead) * 4 > len(self.rows):
            keys = np.fromiter(self.rows, dtype=np.int64)
            self._build()
            self.dead.clear()
            self.index.add_with_ids(np.stack([self.rows[int(i)] for i in keys]), keys)

    def nbytes(self) -> int:
        return int(self.index.ntotal * (DIM * 4 + M * 2 * 4 + 8))


LIBRARIES: dict[str, Callable[[int], Ann]] = {
    "hnswlib": Hnswlib,
    "usearch": Usearch,
    "faiss": Faiss,
}


def dataset(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` stored vectors; near-copy queries of stored ones; queries drawn like the data."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((2000, DIM)).astype(np.float32)
    pick = rng.integers(0, len(centers), n)
    data = centers[pick] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    near = (
        data[rng.integers(0, n, queries)]
        + 0.15 * rng.standard_normal((queries, DIM)).astype(np.float32) / np.sqrt(DIM) * 6
    )
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    fresh = centers[rng.integers(0, len(centers), queries)] + 0.6 * rng.standard_normal(
        (queries, DIM)
    ).astype(np.float32)
    fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
    return data, near.astype(np.float32), fresh.astype(np.float32)


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _recall(index: Ann, data: np.ndarray, alive: np.ndarray, queries: np.ndarray) -> float:
    sims = queries @ data[alive].T
    truth = alive[np.argmax(sims, axis=1)]
    got = [index.search(q, 1) for q in queries]
    return float(np.mean([len(g) and g[0] == t for g, t in zip(got, truth, strict=True)]))


def measure(name: str, n: int, queries: int) -> dict[str, Any]:
    data, near, fresh = dataset(n, queries)
    ids = np.arange(n, dtype=np.int64)
    index = LIBRARIES[name](int(n * 1.2))
    start = time.perf_counter()
    for lo in range(0, n, 1000):
        index.add(ids[lo : lo + 1000], data[lo : lo + 1000])
    add_s = time.perf_counter() - start
    times: list[float] = []
    for q in np.concatenate([near, fresh]):
        t = time.perf_counter()
        index.search(q, 4)
        times.append(time.perf_counter() - t)
    alive = ids
    out: dict[str, Any] = {
        "library": name,
        "n": n,
        "add_us_per_vector": 1e6 * add_s / n,
        "search_p50_us": 1e6 * _percentile(times, 50),
        "search_p99_us": 1e6 * _percentile(times, 99),
        "recall_near": _recall(index, data, alive, near),
        "recall_fresh": _recall(index, data, alive, fresh),
        "index_mb": index.nbytes() / 2**20,
    }
    # Churn: a tenth of the entries expire and as many new ones come.
    rng = np.random.default_rng(1)
    gone = rng.choice(n, n // 10, replace=False)
    start = time.perf_counter()
    index.remove(gone)
    fresh_rows = dataset(n // 10, 1, seed=2)[0]
    new_ids = np.arange(n, n + n // 10, dtype=np.int64)
    for lo in range(0, len(new_ids), 1000):
        index.add(new_ids[lo : lo + 1000], fresh_rows[lo : lo + 1000])
    out["churn_s"] = time.perf_counter() - start
    data2 = np.concatenate([data, fresh_rows])
    alive = np.setdiff1d(np.arange(n + n // 10), gone)
    near2 = data2[alive[rng.integers(0, len(alive), queries)]]
    out["recall_after_churn"] = _recall(index, data2, alive, near2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for n in args.sizes:
        for name in args.libraries:
            row = measure(name, n, args.queries)
            rows.append(row)
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            )
    if args.json:
        meta = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "rows": rows}
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
