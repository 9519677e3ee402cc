"""HTTP requests for the fuzzer (http_fuzz.py), valid and invalid, for every route.

From the OpenAPI document ingress serves, schemathesis (on hypothesis) generates bodies that
fit it (valid) and bodies that break it (invalid: wrong types, missing fields, out-of-range
numbers). Written here, what a schema cannot express: bodies that are not JSON or not UTF-8,
JSON nested deeper than a parser recurses, wrong content types, huge strings and numbers,
unpaired surrogates and other odd unicode, wrong methods and unknown paths.
"""

import contextlib
import json
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

VALID, INVALID = "valid", "invalid"
POST_ROUTES = ("/v1/completions", "/v1/chat/completions")
GET_ROUTES = ("/v1/models", "/health", "/metrics", "/openapi.json")
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class FuzzCase:
    """One request: `route` is the operation it aims at ("POST /v1/completions")."""

    route: str
    kind: str  # VALID or INVALID
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)


def schema_cases(document: dict[str, Any], per_operation: int, seed: int) -> list[FuzzCase]:
    """`per_operation` valid and as many invalid cases for each operation of `document` (fewer
    where the schema allows fewer: a GET with no parameters has one valid request and no
    invalid one)."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(document)
    cases: list[FuzzCase] = []
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an invalid schema raises here
        for mode, kind in ((GenerationMode.POSITIVE, VALID), (GenerationMode.NEGATIVE, INVALID)):
            strategy = operation.as_strategy(generation_mode=mode)
            for kwargs in _drawn(strategy, per_operation, seed):
                cases.append(_from_transport(operation.label, kind, kwargs))
    return cases


def _drawn(strategy: Any, count: int, seed: int) -> list[dict[str, Any]]:
    """Up to `count` requests drawn from a schemathesis strategy, as its transport's
    arguments."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as with_seed
    from hypothesis.errors import Unsatisfiable

    drawn: list[dict[str, Any]] = []

    @with_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(case: Any) -> None:
        drawn.append(case.as_transport_kwargs(base_url="http://fuzz"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Unsatisfiable):  # nothing of this mode exists for it
            collect()
    return drawn[:count]


def _from_transport(label: str, kind: str, kwargs: dict[str, Any]) -> FuzzCase:
    headers = {k: str(v) for k, v in kwargs.get("headers", {}).items() if k.lower() != "cookie"}
    body: bytes | None = None
    if "json" in kwargs:
        body = json.dumps(kwargs["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        body = data if isinstance(data, bytes) else str(data).encode("utf-8", "surrogatepass")
    query = {str(k): str(v) for k, v in (kwargs.get("params") or {}).items()}
    path = kwargs["url"].removeprefix("http://fuzz")
    return FuzzCase(label, kind, kwargs["method"], path, body, headers, query)


def written_cases(model_id: str, rng: random.Random) -> list[FuzzCase]:
    """The invalid requests a schema cannot describe, for every route."""
    cases: list[FuzzCase] = []
    for path in POST_ROUTES:
        route = f"POST {path}"
        cases += [FuzzCase(route, INVALID, "POST", path, raw, JSON) for raw in raw_bodies()]
        good = _valid_body(path, model_id)
        for content_type in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
            "a/b; charset=nope",
        ):
            headers = {"Content-Type": content_type}
            cases.append(FuzzCase(route, INVALID, "POST", path, good, headers))
        for body in odd_bodies(path, model_id, rng):
            cases.append(FuzzCase(route, INVALID, "POST", path, body, JSON))
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            cases.append(FuzzCase(route, INVALID, method, path, good, JSON))
    for path in GET_ROUTES:
        route = f"GET {path}"
        cases.append(FuzzCase(route, INVALID, "POST", path, b"{}", JSON))
        cases.append(FuzzCase(route, INVALID, "GET", path, query={"x": "\u00e9" * 100}))
        cases.append(FuzzCase(route, INVALID, "GET", path, headers={"Authorization": "Bearer"}))
    for path in ("/", "/v1", "/v1/completions/x", "/v2/models", "/%ff", "/" + "a" * 5000):
        cases.append(FuzzCase("other", INVALID, "GET", path))
    return cases


def raw_bodies() -> list[bytes]:
    """Bodies that are not a JSON object: empty, cut short, not UTF-8, nested past any
    parser's recursion, numbers past any float, other JSON values."""
    return [
        b"",
        b"{",
        b'{"model": ',
        b"\xff\xfe\x00{",
        b"\x00" * 64,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"null",
        b"[]",
        b'"text"',
        b"1e999",
        b"NaN",
        b'{"model": NaN, "prompt": Infinity}',
        b'{"prompt": "' + b"9" * 5000 + b'"}',
        b'{"model": 1' + b"0" * 5000 + b"}",
    ]


def odd_bodies(path: str, model_id: str, rng: random.Random) -> Iterator[bytes]:
    """Bodies of the right shape whose values are extreme: huge numbers and strings,
    unpaired surrogates and other odd unicode, values beyond every wire format's ints."""
    huge_int, huge_text = 2**70, "x" * rng.randrange(300_000, 600_000)
    oddities: list[Callable[[dict[str, Any]], None]] = [
        lambda b: b.update(stop_token_ids=[huge_int]),
        lambda b: b.update(top_k=huge_int),
        lambda b: b.update(min_tokens=huge_int),
        lambda b: b.update(max_tokens=huge_int),
        lambda b: b.update(seed=2**63 - 1),
        lambda b: b.update(logprobs=huge_int),
        lambda b: b.update(duet={"cache": {"public_prefix_tokens": huge_int}}),
        lambda b: b.update(duet={"slo": {"kind": "latency", "ttft_ms": 1e308, "tpot_ms": 5e-324}}),
        lambda b: b.update(duet={"slo": {"kind": "deadline", "deadline_ms": 1e308}}),
        lambda b: b.update(temperature=5e-324, top_p=5e-324, repetition_penalty=5e-324),
        lambda b: b.update(stop=["\ud800", "\U0010ffff"]),
        lambda b: b.update(stop="\u202e\u0000"),
        lambda b: b.update(model=model_id + "\u0000"),
        lambda b: b.update(user="\udfff" * 10, **{"\ud800": 1}),
    ]
    if path == "/v1/completions":
        oddities += [
            lambda b: b.update(prompt=huge_text),
            lambda b: b.update(prompt="\ud800\udfff\ud800"),
            lambda b: b.update(prompt="\u0000\u200b\ufeff\U0001f600" * 50),
            lambda b: b.update(prompt=[huge_int]),
            lambda b: b.update(prompt=[2**31, 2**32, 2**63]),
            lambda b: b.update(prompt=list(range(100_000))),
        ]
    else:
        oddities += [
            lambda b: b.update(messages=[{"role": "user", "content": huge_text}]),
            lambda b: b.update(messages=[{"role": "user", "content": "\ud800"}]),
            lambda b: b.update(messages=[{"role": "user", "content": "{{ x }}{% raw %}"}]),
            lambda b: b.update(messages=[{"role": "tool", "name": "\udc00"}]),
            lambda b: b.update(messages=[{"role": "user", "content": "hi"}] * 10_000),
            lambda b: b.update(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        ]
    for change in oddities:
        for stream in (False, True):
            body = json.loads(_valid_body(path, model_id))
            body["stream"] = stream
            change(body)
            yield json.dumps(body).encode()


def _valid_body(path: str, model_id: str) -> bytes:
    if path == "/v1/completions":
        return json.dumps({"model": model_id, "prompt": "Hello", "max_tokens": 2}).encode()
    messages = [{"role": "user", "content": "Hello"}]
    return json.dumps({"model": model_id, "messages": messages, "max_tokens": 2}).encode()
