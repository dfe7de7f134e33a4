"""Images and series through the real tritonserver: one server, both families, every kind.

One server hosts ``fm.efficientnet`` (vision) and ``fm.fracast`` (time
series), each with one task of every kind of its family, built as ``fmplex
task create`` builds them (tests/e2e/vision_series.py; the fuzz tests of
test_fuzz_vision_series.py share it). Requests of all tasks are sent at once
(HTTP and gRPC) so that the hosts' shared batches mix tasks and kinds, and
every answer is compared with the same independent references as the unit
tests (tests/unit/test_vision_kinds.py, test_series_kinds.py): the packages'
own models run alone, ONNX Runtime alone, PEFT's own model alone.

Tolerance: fp32, |fmplex - reference| <= 1e-4 + 1e-4 * |reference|; labels equal.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any, Iterator

import numpy as np
import pytest

from fmplex.families.timeseries import demo_data as dd
from fmplex.families.vision.preprocess import decode_image

from ..unit import test_series_kinds as sk
from ..unit import test_vision_kinds as vk
from ..unit.vision_data import digit_images, photos
from .conftest import FMPLEX, Server
from .vision_series import FORK_LABELS, LORA_LABELS, ONNX_LABELS, SERIES, VISION, VisionSeries, alternating, at_once, cli

pytestmark = pytest.mark.e2e

ATOL = RTOL = 1e-4
MEASURED: dict[str, float] = {}


def close(name: str, got: np.ndarray, want: np.ndarray) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(got - want)
    MEASURED[name] = max(MEASURED.get(name, 0.0), float(err.max()))
    assert not (err > ATOL + RTOL * np.abs(want)).any(), f"{name}: max abs error {err.max():.3g}"


@pytest.fixture(scope="module", autouse=True)
def report_errors() -> Iterator[None]:
    yield
    print("\nmeasured max abs errors:", {k: f"{v:.2e}" for k, v in sorted(MEASURED.items())})


@pytest.fixture(scope="module")
def served(vision_series: VisionSeries) -> dict[str, Any]:
    """The shared server, and what vk.references and the series checks take."""
    return {
        "server": vision_series.server,
        "vision_built": {"states": {"fork13": vision_series.fork_state, "fork_fc": vision_series.fork_state},
                         "peft": vision_series.peft_model, "onnx": vision_series.onnx_path, "tasks": {"clf": vision_series.clf_task}},
        "ref": vision_series.base,
        "ref_ft": vision_series.fine_tuned,
    }


# --- requests ------------------------------------------------------------------------------------


def _at_once(server: Server, calls: list[tuple[str, dict[str, np.ndarray], list[str]]]) -> list[Any]:
    """Every call concurrently, alternating HTTP and gRPC: the host batches them together."""
    return at_once(server, alternating(calls))


def _responses(server: Server, tasks: tuple[str, ...], outcome: str) -> float:
    return sum(server.metric("fmplex_task_responses_total", task=t, outcome=outcome) for t in tasks)


def _passes(server: Server, host: str) -> dict[int, float]:
    """How many shared passes of ``host`` ran each number of rows (fmplex_batch_size_total{host, rows})."""
    out: dict[int, float] = {}
    for line in server.metrics().splitlines():
        m = re.search(r'rows="(\d+)"', line)
        if line.startswith("fmplex_batch_size_total{") and f'host="{host}"' in line and m:
            out[int(m.group(1))] = out.get(int(m.group(1)), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _largest_batch_since(server: Server, host: str, before: dict[int, float]) -> int:
    """The most rows one shared pass of ``host`` ran since ``before`` (the server is shared with other tests)."""
    return max((rows for rows, n in _passes(server, host).items() if n > before.get(rows, 0.0)), default=0)


def _bad(result: Any) -> str:
    assert isinstance(result, str), "a bad request was answered"
    assert "\n" not in result
    assert result.startswith(("400", "StatusCode.INVALID_ARGUMENT")), result
    return result


# --- vision ------------------------------------------------------------------------------------


def _vision_pixels() -> tuple[list[bytes], np.ndarray]:
    digits, _ = digit_images(4, (3, 7))
    images = photos()[:2] + digits
    return images, np.stack([decode_image(b) for b in images])


VISION_OUT = {"v_emb": ["EMBEDDING"], "v_clf": ["LOGITS", "LABEL"], "v_fork": ["LOGITS", "LABEL"],
              "v_onnx": ["LOGITS", "LABEL"], "v_lora": ["LOGITS", "LABEL"]}
VISION_REF = {"v_emb": "emb", "v_clf": "clf", "v_fork": "fork13", "v_onnx": "onnx", "v_lora": "lora"}
LABELS = {"v_fork": FORK_LABELS, "v_onnx": ONNX_LABELS, "v_lora": LORA_LABELS}


def _check_vision(name: str, got: dict[str, np.ndarray], ref: np.ndarray, clf_labels: list[str]) -> None:
    out = got[VISION_OUT[name][0]]
    close(f"vision {name}", out, ref)
    if "LABEL" in got:
        labels = LABELS.get(name, clf_labels)
        assert [x.decode() for x in got["LABEL"]] == [labels[j] for j in ref.argmax(axis=1)]


def test_every_vision_kind_exact_in_shared_batches(served: dict[str, Any]) -> None:
    server: Server = served["server"]
    images, pixels = _vision_pixels()
    refs = vk.references(served["vision_built"], pixels)
    clf_labels = [x.decode() for x in served["vision_built"]["tasks"]["clf"].head.names]
    calls, expect = [], []
    for k, name in enumerate(VISION * 2):
        lo = (k * 2) % len(images)
        sel = slice(lo, lo + 2)
        if k % 2:
            calls.append((name, {"IMAGE": np.array(images[sel], dtype=object)}, VISION_OUT[name]))
        else:
            calls.append((name, {"PIXELS": pixels[sel]}, VISION_OUT[name]))
        expect.append((name, refs[VISION_REF[name]][sel]))
    before, passes = _responses(server, VISION, "ok"), _passes(server, "fm.efficientnet")
    results = _at_once(server, calls)
    for (name, ref), got in zip(expect, results):
        assert not isinstance(got, str), got
        _check_vision(name, got, ref, clf_labels)
    assert server.wait_metric("fmplex_task_responses_total", before + len(calls), outcome="ok") >= before + len(calls)
    assert _responses(server, VISION, "ok") - before == len(calls)
    assert _largest_batch_since(server, "fm.efficientnet", passes) > 2  # requests (2 rows each) of several tasks shared a pass


def test_bad_images_fail_alone_under_load(served: dict[str, Any]) -> None:
    server: Server = served["server"]
    images, pixels = _vision_pixels()
    refs = vk.references(served["vision_built"], pixels)
    clf_labels = [x.decode() for x in served["vision_built"]["tasks"]["clf"].head.names]
    bad = [
        ("v_clf", {"IMAGE": np.array([images[2][: len(images[2]) // 2]], dtype=object)}),  # truncated PNG
        ("v_emb", {"IMAGE": np.array([b"not an image at all"], dtype=object)}),  # corrupt
        ("v_fork", {"PIXELS": np.zeros((1, 3, 32, 32), dtype=np.float32)}),  # wrong shape
        ("v_lora", {"PIXELS": np.full((1, 3, 224, 224), np.nan, dtype=np.float32)}),  # not finite
        ("v_onnx", {"IMAGE": np.array(images[:1], dtype=object), "PIXELS": pixels[:1]}),  # both inputs
    ]
    calls, expect = [], []
    for round_ in range(2):
        for k, name in enumerate(VISION):
            i = (k + round_) % len(images)
            calls.append((name, {"PIXELS": pixels[i : i + 1]}, VISION_OUT[name]))
            expect.append((name, refs[VISION_REF[name]][i : i + 1]))
        for name, inputs in bad:
            calls.append((name, inputs, VISION_OUT[name]))
            expect.append((name, None))
    before_ok, before_bad = _responses(server, VISION, "ok"), _responses(server, VISION, "invalid")
    results = _at_once(server, calls)
    for (name, ref), got in zip(expect, results):
        if ref is None:
            _bad(got)
        else:
            assert not isinstance(got, str), got
            _check_vision(name, got, ref, clf_labels)
    n_bad = sum(1 for _, r in expect if r is None)
    n_shape = 2  # the wrong PIXELS shape breaks the vFM's declared dims: Triton itself refuses it (400), the host never sees it
    server.wait_metric("fmplex_task_responses_total", before_bad + n_bad - n_shape, outcome="invalid")
    server.settled(VISION)
    assert _responses(server, VISION, "invalid") - before_bad == n_bad - n_shape
    assert _responses(server, VISION, "ok") - before_ok == len(calls) - n_bad


# --- series ------------------------------------------------------------------------------------


SERIES_OUT = {"s_fc": ["FORECAST", "QUANTILES"], "s_ft": ["FORECAST", "QUANTILES"], "s_cls": ["LOGITS", "LABEL"], "s_emb": ["EMBEDDING"]}
SERIES_QUANTILES = {"s_fc": [0.1, 0.5, 0.9], "s_ft": None}


def _series_requests() -> list[tuple[str, dict[str, np.ndarray]]]:
    sun, co2, eln, nile = (dd.series(n) for n in ("sunspots", "co2", "elnino", "nile"))
    return [
        ("s_fc", {"SERIES": sk.nan_pad([sun[:120], sun[:309], eln[:64]])}),
        ("s_ft", {"SERIES": sk.nan_pad([nile, sun[50:250]])}),
        ("s_cls", {"SERIES": sk.nan_pad([sun[10:130], co2[100:300], eln[200:330]])}),
        ("s_fc", {"SERIES": np.stack([eln[:300], eln[100:400]]), "LENGTHS": np.array([300, 250], dtype=np.int64),
                  "HORIZON": np.array([100], dtype=np.int64)}),
        ("s_emb", {"SERIES": sk.nan_pad([eln[:48], sun[:200]])}),
        ("s_ft", {"SERIES": sun[None, :280].copy(), "HORIZON": np.array([60], dtype=np.int64)}),
    ]


def _series_rows(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    s = inputs["SERIES"]
    if "LENGTHS" in inputs:
        return [s[i, : int(n)] for i, n in enumerate(inputs["LENGTHS"])]
    return [r[: int(np.max(np.nonzero(~np.isnan(r))[0])) + 1] for r in s]


def _check_series(served: dict[str, Any], name: str, inputs: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    rows = _series_rows(inputs)
    if name in ("s_fc", "s_ft"):
        model = served["ref_ft"] if name == "s_ft" else served["ref"]
        h = int(inputs["HORIZON"][0]) if "HORIZON" in inputs else (24 if name == "s_fc" else 48)
        qs = SERIES_QUANTILES[name] or list(model.quantiles)
        assert got["FORECAST"].shape == (len(rows), h)
        for i, row in enumerate(rows):
            want = sk.ref_forecast(model, row, h)
            close(f"series {name} quantiles", got["QUANTILES"][i], want[:, [model.quantiles.index(q) for q in qs]])
            close(f"series {name} point", got["FORECAST"][i], want[:, model.quantiles.index(0.5)])
    elif name == "s_cls":
        from safetensors.numpy import load_file  # noqa: PLC0415

        from fmplex.artifacts import read_manifest  # noqa: PLC0415

        vdir = served["server"].repo / "s_cls" / "1"
        w = load_file(str(vdir / "weights.safetensors"))
        labels = read_manifest(vdir)["labels"]
        logits = sk.ref_embedding(served["ref"], rows) @ w["head.weight"].astype(np.float64).T + w["head.bias"]
        close("series classifier logits", got["LOGITS"], logits)
        assert [x.decode() for x in got["LABEL"]] == [labels[j] for j in logits.argmax(axis=1)]
    else:
        close("series embedding", got["EMBEDDING"], sk.ref_embedding(served["ref"], rows))


def test_every_series_kind_exact_in_shared_batches(served: dict[str, Any]) -> None:
    server: Server = served["server"]
    reqs = _series_requests()
    before, passes = _responses(server, SERIES, "ok"), _passes(server, "fm.fracast")
    results = _at_once(server, [(n, inp, SERIES_OUT[n]) for n, inp in reqs])
    for (name, inputs), got in zip(reqs, results):
        assert not isinstance(got, str), got
        _check_series(served, name, inputs, got)
    server.settled(SERIES)
    assert _responses(server, SERIES, "ok") - before == len(reqs)
    assert _largest_batch_since(server, "fm.fracast", passes) > 3  # requests of several tasks (3 rows at most each) shared a pass


def test_bad_series_fail_alone_under_load(served: dict[str, Any]) -> None:
    server: Server = served["server"]
    sun = dd.series("sunspots")
    holed = sun[None, :100].copy()
    holed[0, 40] = np.nan
    infinite = sun[None, :100].copy()
    infinite[0, 10] = np.inf
    bad = [
        ("s_emb", {"SERIES": holed}),  # NaN inside; the task refuses missing values
        ("s_fc", {"SERIES": infinite}),  # infinity
        ("s_fc", {"SERIES": sun[None, :5].copy()}),  # too short
        ("s_fc", {"SERIES": sun[None, :150].copy(), "HORIZON": np.array([121], dtype=np.int64)}),  # over max_horizon
        ("s_ft", {"SERIES": sun[None, :150].copy(), "LENGTHS": np.array([151], dtype=np.int64)}),  # length out of range
    ]
    good = _series_requests()
    calls = [(n, inp, SERIES_OUT[n]) for n, inp in good + bad + good]
    before_ok, before_bad = _responses(server, SERIES, "ok"), _responses(server, SERIES, "invalid")
    results = _at_once(server, calls)
    for (name, inputs, _), got in zip(calls, results):
        if any(inputs is b for _, b in bad):
            _bad(got)
        else:
            assert not isinstance(got, str), got
            _check_series(served, name, inputs, got)
    server.wait_metric("fmplex_task_responses_total", before_bad + len(bad), outcome="invalid")
    server.settled(SERIES)
    assert _responses(server, SERIES, "invalid") - before_bad == len(bad)
    assert _responses(server, SERIES, "ok") - before_ok == 2 * len(good)


# --- perf ------------------------------------------------------------------------------------


def test_perf_runs_perf_analyzer_on_an_image_and_a_series_vfm(served: dict[str, Any]) -> None:
    server: Server = served["server"]
    before = _responses(server, ("v_clf", "s_fc"), "ok")
    out = subprocess.run([FMPLEX, "perf", "v_clf", "s_fc", "--url", server.grpc_url, "--concurrency-range", "2",
                          "--request-count", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    counts = {m.group(1): int(m.group(2)) for m in
              re.finditer(r"^  (\S+)\s+concurrency \d+\s+[\d.]+ infer/s\s+(\d+) requests", out.stdout, re.M)}
    assert counts == {"v_clf": 4, "s_fc": 4}, out.stdout[-2000:]
    server.settled(("v_clf", "s_fc"))
    assert _responses(server, ("v_clf", "s_fc"), "ok") - before >= 8  # perf_analyzer's warm-up requests come on top


# --- lifecycle ---------------------------------------------------------------------------------


def test_undeploy_and_deploy_live_and_status(served: dict[str, Any]) -> None:
    server: Server = served["server"]
    repo, url = str(server.repo), server.grpc_url
    _, pixels = _vision_pixels()
    status = cli("status", "--repo", repo, "--url", url)
    assert "fm.efficientnet" in status and "fm.fracast" in status and "v_lora" in status and "s_ft" in status
    cli("undeploy", "v_emb", "s_emb", "--repo", repo, "--url", url)
    gone = _at_once(server, [("v_emb", {"PIXELS": pixels[:1]}, ["EMBEDDING"]), ("v_clf", {"PIXELS": pixels[:1]}, ["LOGITS"])])
    assert isinstance(gone[0], str) and not isinstance(gone[1], str)
    cli("deploy", "v_emb", "s_emb", "--repo", repo, "--url", url)
    back = _at_once(server, [("v_emb", {"PIXELS": pixels[:1]}, ["EMBEDDING"]),
                             ("s_emb", {"SERIES": dd.series("elnino")[None, :64].copy()}, ["EMBEDDING"])])
    close("vision emb after redeploy", back[0]["EMBEDDING"], vk.ref_pooled(pixels[:1]).numpy())
    close("series emb after redeploy", back[1]["EMBEDDING"], sk.ref_embedding(served["ref"], [dd.series("elnino")[:64]]))
