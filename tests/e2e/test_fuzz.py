"""Hostile input, property-based (hypothesis), against the real server.

Raw HTTP/JSON (and Triton's binary tensor extension) on /v2/models/<vFM>/infer,
and tritonclient gRPC: random bytes and JSON bodies, infer requests with
wrong datatypes, shapes (negative, huge, mismatched with the data), names,
parameters and outputs, invalid UTF-8, and valid but odd texts (emoji, RTL,
control characters, 10k-character strings).

Property, for every request: it gets either an error -- HTTP 4xx with a JSON
``{"error": ...}`` body (gRPC: a client-error status) -- or the correct
answer, checked against a reference independent of fmplex's code
(transformers' MiniLM, one row at a time, and the task's head weights read
from its safetensors file, as tests/e2e/test_correctness.py does). After every
example the server is ready and answers a fixed sentiment request correctly.

5xx answers are failures, with two justified exceptions that never reach a
model (so fmplex cannot change them):

- Triton's HTTP front end answers 500 when its JSON parser (TritonJson)
  refuses the body ("Unable to parse 'shape': ...", "failed to parse the
  request JSON buffer: ...", and "parameter key '' was not found in the JSON"
  for a parameter name holding a NUL, found by ``make fuzz``): TritonJson
  reports every parse failure as TRITONSERVER_ERROR_INTERNAL (triton-inference-server/server#8762, #8773).
- 503 "deadline exceeded", when a request sets Triton's ``timeout`` parameter
  shorter than its queueing (documented in the README's error table).

Three requests crash Triton instead; the shared-server properties leave them
out, and each runs against ``fmplex serve`` (its host watchdog and server
supervisor on), with other clients calling all along: service must come back
within a bound, no other client's call may be answered wrong, and none may go
unanswered -- except, where the host's stub dies, the calls that were inside
it (Triton never answers those; at most one per client, all sent before the
crash):

- a shape whose element count overflows 64 bits, with empty data: the host's
  Python stub aborts (the watchdog reloads the host; that reload sometimes
  aborts tritonserver, and ``fmplex serve`` starts it again);
- a JSON input of a fixed-size datatype with a huge shape: Triton allocates
  the shape's byte size before reading the data (std::bad_alloc aborts it;
  ``fmplex serve`` starts it again);
- ``classification`` on the BYTES output LABEL: tritonserver dies of SIGFPE
  (``fmplex serve`` starts it again).

``make test``: derandomized, no example database (tests/e2e/fuzzing.py);
``make fuzz``: FUZZ_EXAMPLES random examples per property, with a database.
"""

from __future__ import annotations

import copy
import http.client
import importlib
import json
import math
import re
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import assume, currently_in_test_context, event, example, given
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from fmplex.control.server import free_ports

from .conftest import EMBEDDED, FMPLEX, Server, text_input
from .fuzzing import ATOL, FUZZ_EXAMPLES, MAX_ROWS, PLAIN, VOCAB, Reference, fuzz, fuzz_settings, odd_text, text_rows
from .reference import EmbeddedReference, mismatch

FIXED = "An absolutely delightful evening, I loved it."
TASKS = ("sentiment", "embed")


# Triton's front end, before any model: its JSON parser reports errors as INTERNAL (HTTP 500).
TRITON_JSON_PARSE_500 = re.compile(
    r"^(Unable to parse |Unable to set '|failed to parse the request JSON buffer|failed to get request params|"
    r"attempt to access JSON|Shape does not match|"
    r"parameter key '[^']*' was not found in the JSON)"  # a parameter name with a NUL: TritonJson cuts the key there
)


@pytest.fixture(scope="module")
def ref(server: Server) -> Reference:
    return Reference(server.repo)


# --- HTTP --------------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        n = self.headers.get("inference-header-content-length")
        return json.loads(self.body[: int(n)] if n else self.body)

    def outputs(self) -> dict[str, np.ndarray]:
        """A 200's outputs, JSON or binary (Triton's binary tensor extension)."""
        n = self.headers.get("inference-header-content-length")
        head = self.json()
        tail = self.body[int(n) :] if n else b""
        out = {}
        for o in head["outputs"]:
            size = (o.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                raw, tail = tail[:size], tail[size:]
                if o["datatype"] == "BYTES":
                    items, i = [], 0
                    while i < len(raw):
                        (k,) = struct.unpack_from("<I", raw, i)
                        items.append(raw[i + 4 : i + 4 + k])
                        i += 4 + k
                    arr = np.array(items, dtype=object)
                else:
                    arr = np.frombuffer(raw, dtype={"FP32": np.float32}[o["datatype"]]).copy()
            elif o["datatype"] == "BYTES":
                arr = np.array([x.encode("utf-8") for x in o["data"]], dtype=object)
            else:
                arr = np.array(o["data"], dtype=np.float32)
            out[o["name"]] = arr.reshape(o["shape"])
        return out


def request(server: Server, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    host, port = server.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def infer(server: Server, model: str, body: bytes, headers: dict[str, str] | None = None) -> Reply:
    return request(server, "POST", f"/v2/models/{model}/infer", body, headers)


def assert_error(reply: Reply, *, deadline_ok: bool = False) -> str:
    """A client mistake: 4xx with a JSON error body (or a justified 5xx, see the module doc)."""
    try:
        body = reply.json()
    except (ValueError, UnicodeDecodeError):
        raise AssertionError(f"HTTP {reply.status} without a JSON body: {reply.body[:200]!r}") from None
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], (reply.status, body)
    message = body["error"]
    assert "Traceback" not in message, message
    if reply.status >= 500:
        justified = (reply.status == 500 and TRITON_JSON_PARSE_500.match(message)) or (
            deadline_ok and reply.status == 503 and "deadline exceeded" in message
        )
        assert justified, f"HTTP {reply.status} for a client's request: {message}"
        if currently_in_test_context():  # make fuzz's statistics count each justified kind
            event(f"justified HTTP {reply.status}: {message[:40]}")
    else:
        assert 400 <= reply.status < 500, (reply.status, message)
    return message


def assert_answer(got: dict[str, np.ndarray], want: dict[str, np.ndarray], wanted: set[str] | None = None) -> None:
    names = set(want) if wanted is None else wanted
    assert set(got) == names, (sorted(got), sorted(names))
    for name in names:
        if want[name].dtype == object:
            assert list(got[name]) == list(want[name]), name
        else:
            assert got[name].shape == want[name].shape, (name, got[name].shape, want[name].shape)
            np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=0, err_msg=name)
    if "EMBEDDING" in got:
        np.testing.assert_allclose(np.linalg.norm(got["EMBEDDING"], axis=1), 1.0, atol=1e-5)


def text_body(rows: list[str], outputs: list[dict[str, Any]] | None = None) -> bytes:
    req: dict[str, Any] = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(rows)], "data": rows}]}
    if outputs is not None:
        req["outputs"] = outputs
    return json.dumps(req).encode()


def assert_healthy(server: Server, ref: Reference) -> None:
    """The server is ready and answers a fixed sentiment request correctly."""
    assert request(server, "GET", "/v2/health/ready").status == 200
    reply = infer(server, "sentiment", text_body([FIXED]))
    assert reply.status == 200, reply.body[:300]
    want = ref.texts("sentiment", [FIXED.encode()])[1]
    assert want["LABEL"][0] == b"positive"
    assert_answer(reply.outputs(), want)


# --- strategies ----------------------------------------------------------------------

json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)
)
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
DATATYPES = ["BYTES", "INT64", "INT32", "INT8", "UINT64", "FP32", "FP64", "FP16", "BF16", "BOOL", "STRING", "", "int64", "TYPE_STRING"]
INPUT_NAMES = ["TEXT", "INPUT_IDS", "ATTENTION_MASK", "text", "TEXT ", "", "LABEL", "OUT_0", "INPUT_IDS\u0000", "nope"]
OUTPUT_NAMES = ["LABEL", "LOGITS", "EMBEDDING", "TOKEN_LOGITS", "OUT_0", "TXT_0", "label", "", "NOPE"]
# Dims: small, negative, zero, huge. Left out here, because they take the server down (each
# has its own crash test under fmplex serve): element counts that overflow 64 bits, and a
# JSON input of a fixed-size datatype whose shape asks for more than 64 MiB (Triton allocates
# the shape's byte size before it looks at the data).
dim = st.one_of(st.integers(-3, 5), st.sampled_from([-1, 0, 255, 256, 257, 2**31, 2**32, 2**40, 2**62]))
shape = st.lists(dim, max_size=4).filter(lambda s: math.prod(abs(d) for d in s) < 2**62)
ALLOC_LIMIT = 2**26


def assume_no_huge_allocation(req: Any) -> None:
    inputs = req.get("inputs") if isinstance(req, dict) else None
    for inp in inputs if isinstance(inputs, list) else []:
        dims = inp.get("shape") if isinstance(inp, dict) else None
        if isinstance(dims, list) and all(type(d) is int for d in dims) and inp.get("datatype") != "BYTES":
            assume(math.prod(abs(d) for d in dims) * 16 <= ALLOC_LIMIT)


# --- 0. how much every property fuzzes ----------------------------------------------------


@fuzz
def test_every_property_fuzzes_as_many_examples_as_asked() -> None:
    """``make fuzz``: every property of tests/e2e runs FUZZ_EXAMPLES random examples with the
    database; ``make test``: its small derandomized set. A property's own cap or override of the
    example count would stop it short of what ``make fuzz`` promises: it shows here."""
    found = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if "fuzz_settings" not in path.read_text(encoding="utf-8"):
            continue
        module = importlib.import_module(f"{__package__}.{path.stem}")
        for name, obj in vars(module).items():
            if hasattr(obj, "hypothesis") and any(m.name == "fuzz" for m in getattr(obj, "pytestmark", [])):
                found[f"{path.stem}.{name}"] = obj._hypothesis_internal_use_settings
    assert len(found) >= 10, sorted(found)  # the five here; multimodal, generative, extension kinds; images, series
    for name, s in found.items():
        if FUZZ_EXAMPLES:
            assert (s.max_examples, s.derandomize, s.database is not None) == (FUZZ_EXAMPLES, False, True), name
        else:
            assert (s.derandomize, s.database) == (True, None) and s.max_examples <= 60, (name, s.max_examples)


# --- 1. random bodies ------------------------------------------------------------------


@fuzz
@fuzz_settings(25)
@given(
    model=st.sampled_from(["sentiment", "embed", "fm.minilm", "no_such_task", "sentiment/versions/0", "embed/versions/-1"]),
    body=st.one_of(
        st.binary(max_size=300),
        json_value.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(["inputs", "outputs", "parameters", "id"]), json_value, max_size=4).map(
            lambda v: json.dumps(v).encode()
        ),
    ),
    headers=st.sampled_from([{}, {"Content-Type": "application/json"}, {"Inference-Header-Content-Length": "7"}]),
)
@example(model="sentiment", body=b"", headers={})
@example(model="sentiment", body=b'{"":null,"parameters":{"\\u0000":null}}', headers={})  # found by make fuzz: Triton's 500
@example(model="sentiment", body=b"\xff\xfe\x00garbage", headers={"Inference-Header-Content-Length": "2"})
@example(model="sentiment", body=b'{"inputs": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}', headers={})
def test_random_bodies_get_a_json_error(server: Server, ref: Reference, model: str, body: bytes, headers: dict[str, str]) -> None:
    reply = infer(server, model, body, headers)
    assert_error(reply)  # never a valid inference request
    assert_healthy(server, ref)


# --- 2. infer requests, valid ones broken in many ways ------------------------------------


INPUT_MUTATIONS = [
    "datatype", "shape", "shape_type", "name", "drop_field", "data_garbage", "data_element", "duplicate_input",
    "extra_input", "mask_with_text", "empty", "too_many_rows", "nest_data",
]
REQUEST_MUTATIONS = [
    "unknown_output", "output_params", "top_params", "id", "inputs_type", "binary_outputs", "subset_outputs", "ignored_params",
]


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(type(x) is int for x in v)


def _mutate(draw: Any, req: dict[str, Any], kind: str, names: list[str]) -> tuple[str, bool]:
    """Apply one mutation to ``req``; returns (its name, whether it keeps the answer)."""
    inputs = req.get("inputs")
    inp = inputs[0] if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict) else None
    name = draw(st.sampled_from(REQUEST_MUTATIONS if inp is None else INPUT_MUTATIONS + REQUEST_MUTATIONS))
    dims = inp.get("shape") if inp is not None and _ints(inp.get("shape")) else None
    if name == "datatype":
        inp["datatype"] = draw(st.sampled_from([d for d in DATATYPES if d != inp.get("datatype")]) | st.text(max_size=6))
    elif name == "shape":
        new = draw(shape)
        inp["shape"] = new if new != inp.get("shape") else [*new, 1]
    elif name == "shape_type":
        inp["shape"] = draw(json_value.filter(lambda v: not _ints(v)))
    elif name == "name":
        inp["name"] = draw(st.sampled_from([n for n in INPUT_NAMES if n != inp.get("name")]) | st.text(max_size=10))
    elif name == "drop_field" and inp:
        inp.pop(draw(st.sampled_from(sorted(inp))))
    elif name == "data_garbage":
        inp["data"] = draw(json_value)
    elif name == "data_element" and isinstance(inp.get("data"), list) and inp["data"]:
        i = draw(st.integers(0, len(inp["data"]) - 1))
        bad = st.none() | st.booleans() | st.dictionaries(st.text(max_size=4), json_scalar, max_size=2)
        if kind == "text":  # not a string, and not a list (Triton flattens nested lists)
            bad = bad | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
        else:  # not an integer
            bad = bad | st.text(max_size=5) | st.floats(allow_nan=False).filter(lambda f: not f.is_integer())
        inp["data"][i] = draw(bad)
    elif name == "duplicate_input":
        inputs.append(copy.deepcopy(inp))
    elif name == "extra_input":
        inputs.append({"name": draw(st.sampled_from(INPUT_NAMES) | st.text(max_size=8)), "datatype": draw(st.sampled_from(DATATYPES)),
                       "shape": [1], "data": [draw(json_scalar)]})
    elif name == "mask_with_text":
        n = math.prod(dims) if dims and 0 < math.prod(dims) <= 1024 else 1
        inputs.append({"name": "ATTENTION_MASK", "datatype": "INT64", "shape": [1, n], "data": [1] * n})
    elif name == "empty":
        inp["shape"] = [0] if kind == "text" else [0, dims[1] if dims and len(dims) > 1 else 3]
        inp["data"] = []
    elif name == "too_many_rows":
        if kind == "text":
            inp["shape"], inp["data"] = [MAX_ROWS + 1], ["word"] * (MAX_ROWS + 1)
        else:
            inp["shape"], inp["data"] = [MAX_ROWS + 1, 3], [101, 7592, 102] * (MAX_ROWS + 1)
            req["inputs"] = [inp]
    elif name == "nest_data":  # Triton accepts data nested as the shape: same answer
        data = inp.get("data")
        if kind == "ids" and dims and len(dims) == 2 and dims[1] > 0 and isinstance(data, list) and len(data) == math.prod(dims):
            inp["data"] = [data[i : i + dims[1]] for i in range(0, len(data), dims[1])]
        return name, True
    elif name == "unknown_output":
        req["outputs"] = [{"name": draw(st.sampled_from(["TOKEN_LOGITS", "OUT_0", "TXT_0", "label", "", "NOPE", "TEXT"]) | st.text(max_size=8))}]
    elif name == "output_params":
        # never "classification": on LABEL (BYTES) it kills tritonserver (see the crash tests below)
        params = draw(
            st.dictionaries(st.sampled_from(["binary_data", "shared_memory_region", "shared_memory_byte_size", "x"]), json_value, min_size=1, max_size=2)
            | json_value.filter(lambda v: not isinstance(v, dict))
        )
        req["outputs"] = [{"name": draw(st.sampled_from(["LABEL", "LOGITS", "EMBEDDING"])), "parameters": params}]
    elif name == "top_params":
        req["parameters"] = draw(
            st.dictionaries(st.sampled_from(["timeout", "priority", "sequence_id", "sequence_start", "binary_data_output", "x"]), json_value, min_size=1, max_size=3)
            | json_value.filter(lambda v: not isinstance(v, dict))
        )
    elif name == "id":
        req["id"] = draw(json_value)
    elif name == "inputs_type":
        req["inputs"] = draw(json_value.filter(lambda v: not isinstance(v, list) or not v or not isinstance(v[0], dict)))
    elif name == "binary_outputs":
        req["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in names]
        return name, True
    elif name == "subset_outputs":
        req["outputs"] = [{"name": names[-1]}]
        return name, True
    elif name == "ignored_params":
        req["parameters"] = {"x": draw(st.text(max_size=8) | st.booleans() | st.integers(-(2**31), 2**31)), "timeout": 60_000_000}
        return name, True
    return name, False


@st.composite
def infer_requests(draw: Any) -> tuple[str, bytes, str, Any, list[str], bool, list[str]]:
    """(task, body, kind, the valid base's rows, mutations, whether all keep the answer, outputs asked for)."""
    task = draw(st.sampled_from(TASKS))
    kind = draw(st.sampled_from(["text", "ids"]))
    if kind == "text":
        rows = draw(st.lists(st.sampled_from(PLAIN) | st.text(min_size=1, max_size=30), min_size=1, max_size=3))
        req: dict[str, Any] = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(rows)], "data": list(rows)}]}
        base: Any = rows
    else:
        n, t = draw(st.integers(1, 3)), draw(st.integers(1, 8))
        ids = np.array(draw(st.lists(st.integers(0, VOCAB - 1), min_size=n * t, max_size=n * t)), dtype=np.int64).reshape(n, t)
        req = {"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [n, t], "data": ids.reshape(-1).tolist()}]}
        mask = None
        if draw(st.booleans()):
            lengths = draw(st.lists(st.integers(1, t), min_size=n, max_size=n))
            mask = np.array([[1] * k + [0] * (t - k) for k in lengths], dtype=np.int64)  # right padding
            req["inputs"].append({"name": "ATTENTION_MASK", "datatype": "INT64", "shape": [n, t], "data": mask.reshape(-1).tolist()})
        base = (ids, mask)
    names = ["EMBEDDING"] if task == "embed" else ["LABEL", "LOGITS"]
    mutations = [_mutate(draw, req, kind, names) for _ in range(draw(st.integers(0, 3)))]
    assume_no_huge_allocation(req)
    body = json.dumps(req).encode()
    subset = [o.get("name") for o in req.get("outputs", []) if isinstance(o, dict)] if "outputs" in req else names
    return task, body, kind, base, [m for m, _ in mutations], all(keep for _, keep in mutations), subset


@fuzz
@fuzz_settings(55)
@given(case=infer_requests())
def test_malformed_infer_requests_get_an_error_or_the_right_answer(server: Server, ref: Reference, case: Any) -> None:
    task, body, kind, base, mutations, neutral, wanted = case
    expect = ref.texts(task, [r.encode() for r in base]) if kind == "text" else ref.ids(task, *base)
    reply = infer(server, task, body)
    if reply.status == 200:
        # Accepted: only a request whose rows are the valid base's may be, and it gets their answer.
        assert expect[0] == "ok", (mutations, expect, body[:300])
        assert_answer(reply.outputs(), expect[1], set(wanted))
    else:
        message = assert_error(reply)
        if neutral:  # nothing but harmless changes: the error is the base's own, said clearly
            assert reply.status == 400 and expect[0] == "error", (mutations, reply.status, message)
            assert expect[1].lower() in message.lower(), (expect[1], message)
    assert_healthy(server, ref)


# --- 3. valid but odd texts, tritonclient over HTTP and gRPC ---------------------------------


@fuzz
@fuzz_settings(30)
@given(task=st.sampled_from(TASKS), rows=text_rows(), protocol=st.sampled_from(["http", "grpc"]))
@example(task="sentiment", rows=["x" * 10000], protocol="http")
@example(task="embed", rows=["ab " * 3400, "fine"], protocol="grpc")
@example(task="sentiment", rows=[" \t\n\x1c\x1f\x85\u3000"], protocol="grpc")
@example(task="embed", rows=["😀" * 3000, "مرحبا", "\u202eevil"], protocol="http")
def test_odd_texts_get_the_right_answer_or_a_clear_error(server: Server, ref: Reference, task: str, rows: list[str], protocol: str) -> None:
    mod = grpcclient if protocol == "grpc" else httpclient
    client = grpcclient.InferenceServerClient(server.grpc_url) if protocol == "grpc" else httpclient.InferenceServerClient(server.http_url, network_timeout=60)
    expect = ref.texts(task, [r.encode() for r in rows])
    try:
        kwargs = {"client_timeout": 60} if protocol == "grpc" else {}
        try:
            result = client.infer(task, [text_input(mod, rows)], **kwargs)
        except InferenceServerException as exc:
            assert expect[0] == "error", f"a valid request was refused: {exc}"
            assert expect[1].lower() in str(exc).lower(), (expect[1], str(exc))
            assert exc.status() in ("400", "StatusCode.INVALID_ARGUMENT"), exc.status()
        else:
            assert expect[0] == "ok", f"accepted, but the host should refuse it ({expect[1]})"
            assert_answer({n: result.as_numpy(n) for n in expect[1]}, expect[1])
    finally:
        client.close()
    assert_healthy(server, ref)


# --- 4. invalid UTF-8 through the binary tensor extension -------------------------------------


def binary_text_body(rows: list[bytes], declared: int | None = None) -> tuple[bytes, dict[str, str]]:
    raw = b"".join(struct.pack("<I", len(r)) + r for r in rows)
    head = json.dumps(
        {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(rows)], "parameters": {"binary_data_size": len(raw) if declared is None else declared}}]}
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


@fuzz
@fuzz_settings(25)
@given(
    task=st.sampled_from(TASKS),
    rows=st.lists(st.binary(min_size=1, max_size=24) | odd_text.map(lambda s: s.encode("utf-8")), min_size=1, max_size=4),
    skew=st.sampled_from([0, 0, 0, -1, 1, 7]),
)
@example(task="sentiment", rows=[b"ok", b"\xff\xfe\xfa"], skew=0)
@example(task="embed", rows=[b"\xed\xa0\x80 surrogate"], skew=0)  # CESU-8 surrogate: not UTF-8
@example(task="sentiment", rows=[b"\xc0\xaf overlong"], skew=0)
@example(task="sentiment", rows=[b"fine \xf4\x90\x80\x80"], skew=0)  # above U+10FFFF
def test_invalid_utf8_rows_get_a_clear_error(server: Server, ref: Reference, task: str, rows: list[bytes], skew: int) -> None:
    raw_len = sum(4 + len(r) for r in rows)
    body, headers = binary_text_body(rows, raw_len + skew)
    reply = infer(server, task, body, headers)
    expect = ref.texts(task, rows) if skew == 0 else ("error", "")
    if reply.status == 200:
        assert expect[0] == "ok", (rows, expect)
        assert_answer(reply.outputs(), expect[1])
    else:
        message = assert_error(reply)
        assert expect[0] == "error" and expect[1].lower() in message.lower(), (rows, expect, message)
    assert_healthy(server, ref)


# --- 5. tritonclient gRPC: wrong names, datatypes and shapes ----------------------------------

NUMPY = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP64": np.float64, "UINT8": np.uint8, "BOOL": np.bool_, "BYTES": np.object_}


@st.composite
def grpc_inputs(draw: Any) -> list[tuple[str, str, list[int], np.ndarray]]:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["TEXT", "INPUT_IDS", "ATTENTION_MASK", "OTHER"]))
        dtype = draw(st.sampled_from(sorted(NUMPY)))
        dims = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
        n = math.prod(dims)
        if dtype == "BYTES":
            arr = np.array([draw(st.sampled_from(PLAIN) | st.text(max_size=20)).encode() for _ in range(n)], dtype=object).reshape(dims)
        elif dtype in ("FP32", "FP64"):
            arr = np.array(draw(st.lists(st.floats(width=32), min_size=n, max_size=n)), dtype=NUMPY[dtype]).reshape(dims)
        elif dtype == "BOOL":
            arr = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=np.bool_).reshape(dims)
        else:
            info = np.iinfo(NUMPY[dtype])
            arr = np.array(draw(st.lists(st.integers(max(info.min, -5), min(info.max, VOCAB + 5)), min_size=n, max_size=n)), dtype=NUMPY[dtype]).reshape(dims)
        declared = list(dims) if draw(st.integers(0, 3)) else draw(st.lists(st.integers(-2, 2**33), min_size=1, max_size=3).filter(lambda s: math.prod(abs(d) for d in s) < 2**62))
        out.append((name, dtype, declared, arr))
    return out


@fuzz
@fuzz_settings(20)
@given(task=st.sampled_from(TASKS), inputs=grpc_inputs())
def test_grpc_wrong_inputs_get_a_client_error_or_the_right_answer(server: Server, ref: Reference, task: str, inputs: Any) -> None:
    infer_inputs = []
    for name, dtype, declared, arr in inputs:
        inp = grpcclient.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        if declared != list(arr.shape):  # a shape that does not match the data
            inp._input.ClearField("shape")
            inp._input.shape.extend(declared)
        infer_inputs.append(inp)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        result = client.infer(task, infer_inputs, client_timeout=60)
    except InferenceServerException as exc:
        result = exc
    finally:
        client.close()
    if isinstance(result, InferenceServerException):
        assert result.status() in ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"), (result.status(), str(result))
        assert "Traceback" not in str(result)
    else:
        # Answered: the request must have been a valid one, and the answer right.
        by = {name: (dtype, declared, arr) for name, dtype, declared, arr in inputs}
        assert len(by) == len(inputs) and set(by) <= {"TEXT", "INPUT_IDS", "ATTENTION_MASK"}, inputs
        assert all(declared == list(arr.shape) for _, declared, arr in by.values()), inputs
        if "TEXT" in by:
            dtype, _, arr = by["TEXT"]
            assert dtype == "BYTES" and arr.ndim == 1 and len(by) == 1, inputs
            expect = ref.texts(task, list(arr))
        else:
            dtype, _, ids = by["INPUT_IDS"]
            mask = by.get("ATTENTION_MASK")
            assert dtype == "INT64" and ids.ndim == 2, inputs
            assert mask is None or (mask[0] == "INT64" and mask[2].shape == ids.shape), inputs
            expect = ref.ids(task, ids, None if mask is None else mask[2])
        assert expect[0] == "ok", (expect, inputs)
        assert_answer({n: result.as_numpy(n) for n in expect[1]}, expect[1])
    assert_healthy(server, ref)


# --- 6. requests that crash Triton, under 'fmplex serve' (host watchdog + server supervisor) ---------

CRASH_BOUND_S = 180.0  # a restart loads the backbone again: seconds on an idle machine, more on a shared one


class Served:
    """``fmplex serve`` as a user runs it (watchdog on, control APIs open), on a private repository."""

    def __init__(self, repo: Path, ports: Any, log: Path, out: Path) -> None:
        self.repo, self.ports, self.log, self.out = repo, ports, log, out
        self.server = Server(None, repo, ports, log)  # type: ignore[arg-type] - only its URLs and helpers are used
        self.proc = subprocess.Popen(
            [FMPLEX, "serve", "--repo", str(repo), "--no-lock", "--log", str(log),
             "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)],
            stdout=out.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_serving(self, timeout: float) -> float:
        """Seconds until a fixed sentiment request is answered right (raises past ``timeout``)."""
        t0 = time.monotonic()
        while True:
            ready, status, answer = _alive_and_serving(self.server)
            if (ready, status) == (200, 200) and '"positive"' in answer:
                return time.monotonic() - t0
            assert self.proc.poll() is None, f"fmplex serve exited ({self.proc.returncode}): {self.out.read_text()[-2000:]}"
            assert time.monotonic() - t0 < timeout, f"not serving after {timeout:.0f}s: {(ready, status, answer)}; {self.out.read_text()[-2000:]}"
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("served")
    repo = work / "repo"
    shutil.copytree(EMBEDDED, repo)
    srv = Served(repo, free_ports(), work / "tritonserver.log", work / "serve.out")
    try:
        srv.wait_serving(300)
        yield srv
    finally:
        srv.stop()


def _alive_and_serving(server: Server) -> tuple[int | str, int | str, str]:
    """(ready status, sentiment status, sentiment answer or error) -- never raises."""
    try:
        ready = request(server, "GET", "/v2/health/ready").status
    except OSError as exc:
        return repr(exc), "-", "-"
    try:
        reply = infer(server, "sentiment", text_body([FIXED]))
    except OSError as exc:
        return ready, repr(exc), "-"
    return ready, reply.status, reply.body[:4000].decode("utf-8", "replace")


class Bystanders:
    """Other clients of the server, calling 'topic' and 'embed' back to back over gRPC.

    Every call is bounded (client deadline); an outcome is "ok" (the right
    answer), "refused" (an error came back: the server was down or
    restarting), or "lost" (no answer before the deadline: a request the
    server took and never answered). Calls sent once service is back must
    all be "ok".
    """

    TEXTS = {"topic": ["Shares rallied after strong earnings", "The striker scored twice"], "embed": ["a quiet evening", "markets fell"]}

    def __init__(self, srv: Served, ref: EmbeddedReference, clients: int = 4, deadline_s: float = 30.0) -> None:
        self.srv, self.ref, self.deadline_s = srv, ref, deadline_s
        self.stop = threading.Event()
        self.calls: list[tuple[float, float, str, str]] = []  # (sent, done, outcome, detail)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]

    def _run(self, k: int) -> None:
        task = "topic" if k % 2 else "embed"
        texts = self.TEXTS[task]
        want = self.ref.answer(task, texts)
        while not self.stop.is_set():
            sent = time.monotonic()
            c = grpcclient.InferenceServerClient(self.srv.server.grpc_url)
            try:
                res = c.infer(task, [text_input(grpcclient, texts)], client_timeout=self.deadline_s)
                wrong = mismatch({n: res.as_numpy(n) for n in want}, want)
                outcome, detail = ("ok", "") if wrong is None else ("wrong", wrong)
            except InferenceServerException as exc:
                lost = "DEADLINE_EXCEEDED" in str(exc) or "Deadline Exceeded" in str(exc)
                outcome, detail = ("lost" if lost else "refused"), str(exc)[:160]
            finally:
                c.close()
            with self.lock:
                self.calls.append((sent, time.monotonic(), outcome, detail))
            if outcome != "ok":
                time.sleep(0.1)

    def __enter__(self) -> Bystanders:
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 60
        while not any(c[2] == "ok" for c in self.calls) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.deadline_s + 30)
        assert not any(t.is_alive() for t in self.threads), "a bystander's call hung past its deadline"


def crash_and_recover(srv: Served, ref: EmbeddedReference, crash: Callable[[], None], *, in_stub_lost: bool = False) -> dict[str, Any]:
    """Send ``crash`` with bystanders running; service must be back within CRASH_BOUND_S,
    no bystander call lost or answered wrong, and every call sent after the recovery answered.

    ``in_stub_lost``: the crash kills the host's stub, and Triton (2.51) never
    answers the requests that were inside it (measured: each bystander's call
    in flight ran into its deadline, while the server itself stayed up). Then
    those calls -- sent before the crash, at most one per client -- are the
    only ones allowed to go unanswered.
    """
    said0 = srv.out.read_text(errors="replace")
    with Bystanders(srv, ref) as others:
        t_crash = time.monotonic()
        crash()
        t_crashed = time.monotonic()
        back = srv.wait_serving(CRASH_BOUND_S)
        t_back = time.monotonic()
        while sum(1 for c in others.calls if c[0] > t_back) < 8 and time.monotonic() < t_back + 60:
            time.sleep(0.1)  # bystanders' calls after the recovery
    calls = others.calls
    said = srv.out.read_text(errors="replace")  # what 'fmplex serve' printed: its watchdog and supervisor
    counts = {o: sum(1 for c in calls if c[2] == o) for o in ("ok", "refused", "lost", "wrong")}
    after = [c for c in calls if c[0] > t_back]
    report = {"back_after_s": round(back, 1), **counts, "after_recovery": len(after),
              "server_restarts": said.count("restarting it") - said0.count("restarting it"),
              "host_reloads": said.count("is gone; reloading") - said0.count("is gone; reloading")}  # fmt: skip
    print(f"\ncrash at t=0: {report}")
    assert counts["wrong"] == 0, [c for c in calls if c[2] == "wrong"][:3]
    lost = [c for c in calls if c[2] == "lost"]
    if in_stub_lost:
        assert len(lost) <= len(others.threads), lost
        assert all(c[0] < t_crashed for c in lost), f"a call sent after the crash went unanswered: {lost}"
    else:
        assert not lost, f"bystander calls without an answer: {lost[:3]}"
    assert after and all(c[2] == "ok" for c in after), [c for c in after if c[2] != "ok"][:3]
    assert all(c[1] >= t_crash for c in calls if c[2] == "refused"), "a call was refused before the crash"
    return report


@pytest.fixture(scope="module")
def crash_ref(served: Served) -> EmbeddedReference:
    return EmbeddedReference(served.repo)


def test_shape_whose_element_count_overflows_is_survived(served: Served, crash_ref: EmbeddedReference) -> None:
    """Triton (2.51) accepts INPUT_IDS shape [2**32, 2**32] with empty data (its element count overflows
    to 0); the host's Python stub then aborts (pybind11 'array is too big', uncaught) and Triton would
    fail every vFM of the host until it is reloaded. The watchdog reloads it."""
    body = json.dumps({"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [2**32, 2**32], "data": []}]}).encode()

    def crash() -> None:
        try:
            reply = infer(served.server, "embed", body)
            assert reply.status >= 400, (reply.status, reply.body[:200])
        except OSError:
            pass

    report = crash_and_recover(served, crash_ref, crash, in_stub_lost=True)
    # The watchdog reloads the host; measured: that reload sometimes aborts tritonserver itself
    # (SIGABRT, "Stream removed"), and then 'fmplex serve' starts the server again.
    assert report["host_reloads"] >= 1 or report["server_restarts"] >= 1, report


def test_classification_on_the_label_output_is_survived(served: Served, crash_ref: EmbeddedReference) -> None:
    """Triton (2.51)'s classification extension divides by the element size of the output's datatype,
    0 for BYTES: 'classification' on a vFM's LABEL output kills tritonserver with SIGFPE. 'fmplex
    serve' starts it again."""
    body = text_body(["hello"], outputs=[{"name": "LABEL", "parameters": {"classification": 1}}])

    def crash() -> None:
        try:
            reply = infer(served.server, "sentiment", body)
            assert reply.status >= 400, (reply.status, reply.body[:200])
        except OSError:
            pass  # the connection died with the server

    report = crash_and_recover(served, crash_ref, crash)
    assert report["server_restarts"] == 1, report


def test_json_input_with_a_huge_shape_is_survived(served: Served, crash_ref: EmbeddedReference) -> None:
    """Triton (2.51)'s HTTP front end allocates an input's byte size from its declared shape before it
    reads the JSON data: INT64 of shape [2**20, 2**20] asks for 8 TiB and tritonserver aborts
    (std::bad_alloc). 'fmplex serve' starts it again."""
    body = json.dumps({"inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [2**20, 2**20], "data": [101]}]}).encode()

    def crash() -> None:
        try:
            reply = infer(served.server, "embed", body)
            assert reply.status >= 400, (reply.status, reply.body[:200])
        except OSError:
            pass

    report = crash_and_recover(served, crash_ref, crash)
    assert report["server_restarts"] == 1, report
