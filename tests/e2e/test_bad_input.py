"""Bad requests get one clear error each, and the server keeps serving correctly."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from .conftest import Server, text_input


def _ids(mod: Any, ids: np.ndarray, mask: np.ndarray | None = None) -> list[Any]:
    inp = mod.InferInput("INPUT_IDS", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids.astype(np.int64))
    out = [inp]
    if mask is not None:
        m = mod.InferInput("ATTENTION_MASK", list(mask.shape), "INT64")
        m.set_data_from_numpy(mask.astype(np.int64))
        out.append(m)
    return out


def _raw(mod: Any, name: str, arr: np.ndarray, dtype: str) -> list[Any]:
    inp = mod.InferInput(name, list(arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    return [inp]


# name -> (inputs builder, words the error must contain)
CASES: dict[str, tuple[Callable[[Any], list[Any]], str]] = {
    "wrong datatype": (lambda m: _raw(m, "TEXT", np.array([1.5], dtype=np.float32), "FP32"), "data-type"),
    "wrong shape (rank 2 text)": (lambda m: [text_input(m, [b"a", b"b"])] and _raw(m, "TEXT", np.array([[b"a", b"b"]], dtype=object), "BYTES"), "shape"),
    "wrong shape (rank 1 ids)": (lambda m: _raw(m, "INPUT_IDS", np.array([101, 102], dtype=np.int64), "INT64"), "shape"),
    "empty request": (lambda m: [text_input(m, [])], "empty"),
    "empty text": (lambda m: [text_input(m, [b"   "])], "empty"),
    "no input": (lambda m: [], "missing input"),
    "oversized text": (lambda m: [text_input(m, [b"word " * 4000])], "bytes"),
    "too many tokens": (lambda m: [text_input(m, ["supercalifragilistic " * 120])], "tokens"),
    "invalid utf-8": (lambda m: [text_input(m, [b"ok", b"\xff\xfe\xfa"])], "UTF-8"),
    "both text and ids": (lambda m: [text_input(m, ["hi"])] + _ids(m, np.array([[101, 102]])), "either"),
    "ids out of vocabulary": (lambda m: _ids(m, np.array([[101, 99999999, 102]])), "INPUT_IDS must lie"),
    "mask shape mismatch": (lambda m: _ids(m, np.array([[101, 7592, 102]]), np.array([[1, 1]])), "ATTENTION_MASK"),
    "mask not 0/1": (lambda m: _ids(m, np.array([[101, 7592, 102]]), np.array([[1, 2, 1]])), "0 and 1"),
    "too many rows": (lambda m: [text_input(m, ["x"] * 300)], "rows"),
}


def _client(server: Server, protocol: str) -> Any:
    if protocol == "grpc":
        return grpcclient, grpcclient.InferenceServerClient(server.grpc_url)
    return httpclient, httpclient.InferenceServerClient(server.http_url, network_timeout=60)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_request_gets_clear_error_and_server_keeps_serving(server: Server, protocol: str, case: str) -> None:
    mod, client = _client(server, protocol)
    build, words = CASES[case]
    try:
        kwargs = {"client_timeout": 60} if protocol == "grpc" else {}
        with pytest.raises(InferenceServerException) as err:
            client.infer("sentiment", build(mod), **kwargs)
        message = str(err.value)
        assert words.lower() in message.lower(), message
        assert "Traceback" not in message
        ok = client.infer("sentiment", [text_input(mod, ["An absolutely delightful evening, I loved it."])], **kwargs)
        assert ok.as_numpy("LABEL")[0] == b"positive"
    finally:
        client.close()


def test_unknown_output_and_unknown_model(server: Server, http: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="NOPE"):
        http.infer("sentiment", [text_input(httpclient, ["hi"])], outputs=[httpclient.InferRequestedOutput("NOPE")])
    with pytest.raises(InferenceServerException, match="unknown model|not found"):
        http.infer("no_such_task", [text_input(httpclient, ["hi"])])


def test_bad_row_fails_only_its_own_request_in_a_shared_batch(server: Server) -> None:
    """A too-long request batched with good ones fails alone (error found after
    the batched tokenization, not before): the others are answered."""
    import concurrent.futures as cf

    def call(texts: list[str]) -> Any:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return c.infer("topic", [text_input(grpcclient, texts)], client_timeout=60)
        except InferenceServerException as exc:
            return exc
        finally:
            c.close()

    jobs = [["Stocks rally as inflation cools"]] * 6 + [["token " * 400]] + [["Team wins the league title"]] * 6
    with cf.ThreadPoolExecutor(13) as pool:
        results = list(pool.map(call, jobs))
    errors = [r for r in results if isinstance(r, InferenceServerException)]
    assert len(errors) == 1 and "tokens" in str(errors[0])
    labels = [r.as_numpy("LABEL")[0] for r in results if not isinstance(r, InferenceServerException)]
    assert labels == [b"finance"] * 6 + [b"sports"] * 6
