"""Hostile image and series input, property-based (hypothesis), against the real server.

The server of tests/e2e/vision_series.py (shared with test_vision_series.py)
hosts ``fm.efficientnet`` and ``fm.fracast``; these tests send to three tasks
of each (vision: embedding, ONNX head, a fork at block 13; series: zero-shot
forecast, a forked head, an embedding that rejects missing values and needs a
longer context). Every example sends a few requests at once, alternating HTTP
and gRPC, so that good and bad requests of different tasks share the hosts'
batches:

- vision: ``IMAGE`` rows (JPEG/PNG of random sizes and modes; truncated,
  bit-flipped, foreign formats, 16-bit/CMYK modes, headers declaring huge or
  extremely elongated sizes; empty rows; too many rows) and ``PIXELS`` (wrong
  shapes and datatypes, NaN/inf, huge finite values), both inputs or none;
- series: ``SERIES`` rows with NaN/inf placed at the start, inside, at the end
  or everywhere, too-short contexts, rows longer than the model's window,
  ``LENGTHS`` that do or do not match, ``HORIZON`` in and out of range, wrong
  datatypes and shapes.

Property: a request the documented rules refuse gets a one-line HTTP 400 /
gRPC INVALID_ARGUMENT (never another code, never a hang); every other request
gets its exact answer; after every example the server is ready and answers a
fixed image and a fixed series request exactly. Which requests are bad is
decided here from the documented rules (docs/vision.md, docs/timeseries.md),
not by fmplex's code; answers are compared with the references of
tests/e2e/test_vision_series.py: the packages' own models run alone on each
row (efficientnet-lite-pytorch, fracast's ``forecast_batch``) and ONNX
Runtime alone. The preprocessing reference is the documented pipeline done
here with Pillow and numpy.

Tolerance: fp32, |fmplex - reference| <= 1e-4 + 1e-4 * |reference|; labels equal.

``make test``: derandomized, a few examples (tests/e2e/fuzzing.py);
``make fuzz``: FUZZ_EXAMPLES random examples per property, with a database.
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from hypothesis import event, example, given
from hypothesis import strategies as st
from PIL import Image

from fmplex.families.timeseries import demo_data as dd

from ..unit import test_series_kinds as sk
from ..unit import test_vision_kinds as vk
from ..unit.vision_data import digit_images, photos
from .conftest import Server
from .fuzzing import fuzz, fuzz_settings
from .vision_series import FORK_LABELS, ONNX_LABELS, Call, VisionSeries, alternating, at_once, call

pytestmark = pytest.mark.e2e

ATOL = RTOL = 1e-4

# --- the documented limits (docs/vision.md, docs/timeseries.md; the deploy defaults) ---------------
MAX_IMAGE_ROWS, MAX_IMAGE_BYTES, MAX_PIXELS = 64, 20 * 1024 * 1024, 40_000_000
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MAX_SERIES_ROWS, MAX_STEPS, WINDOW = 256, 65536, 2048

VISION = {"v_emb": ["EMBEDDING"], "v_onnx": ["LOGITS", "LABEL"], "v_fork": ["LOGITS", "LABEL"]}
# name -> (default horizon, max horizon, quantiles or None (all), min_context, missing): the options
# tests/e2e/vision_series.py builds these tasks with
SERIES = {
    "s_fc": (24, 120, [0.1, 0.5, 0.9], 8, "mask"),
    "s_ft": (48, 96, None, 8, "mask"),
    "s_emb": (None, None, None, 32, "reject"),
}
SERIES_OUT = {"s_fc": ["FORECAST", "QUANTILES"], "s_ft": ["FORECAST", "QUANTILES"], "s_emb": ["EMBEDDING"]}


@pytest.fixture(scope="module")
def served(vision_series: VisionSeries) -> dict[str, Any]:
    """The shared server, and the references of its tasks these tests send to."""
    return {
        "server": vision_series.server,
        "vision": VisionReference(vision_series.fork_state, vision_series.onnx_path),
        "series": SeriesReference(vision_series.base, vision_series.fine_tuned),
    }


# --- references --------------------------------------------------------------------------------


def _key(*parts: Any) -> bytes:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
    return h.digest()


class VisionReference:
    """The documented pipeline (Pillow + numpy) and the packages' own models, one row at a time."""

    def __init__(self, fork_state: dict[str, torch.Tensor], onnx_path: Path) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        self.base = vk.package_model()
        self.fork = vk.package_model(fork_state)
        self.onnx = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.cache: dict[bytes, dict[str, np.ndarray]] = {}

    @staticmethod
    def pixels(data: bytes) -> tuple[str, Any]:
        """("ok", [3, 224, 224]) or ("error", why) for one encoded image."""
        if not data:
            return "error", "empty"
        if len(data) > MAX_IMAGE_BYTES:
            return "error", "too many bytes"
        try:
            img = Image.open(io.BytesIO(data), formats=["JPEG", "PNG"])
        except Exception:  # noqa: BLE001 - any refusal of the header
            return "error", "not a JPEG or PNG"
        w, h = img.size
        if w <= 0 or h <= 0 or w * h > MAX_PIXELS:
            return "error", "declared size"
        scale = 256 / min(w, h)
        size = (max(256, round(w * scale)), max(256, round(h * scale)))
        if size[0] * size[1] > MAX_PIXELS:
            return "error", "aspect ratio"
        if img.mode not in IMAGE_MODES:
            return "error", "mode"
        try:
            img.load()
            rgb = img.convert("RGB")
        except Exception:  # noqa: BLE001 - truncated or corrupt
            return "error", "corrupt"
        if size != (w, h):
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        left, top = (size[0] - 224) // 2, (size[1] - 224) // 2
        arr = np.asarray(rgb.crop((left, top, left + 224, top + 224)), dtype=np.float32) / np.float32(255.0)
        return "ok", np.ascontiguousarray(((arr - MEAN) / STD).transpose(2, 0, 1))

    @torch.no_grad()
    def row(self, task: str, x: np.ndarray) -> np.ndarray:
        """One task's answer (EMBEDDING or LOGITS) for one preprocessed row, run alone (cached)."""
        key = _key("fork" if task == "v_fork" else "base", x)
        if key not in self.cache:
            t = torch.from_numpy(np.ascontiguousarray(x[None]))
            if task == "v_fork":
                self.cache[key] = {"v_fork": self.fork(t).numpy()}
            else:
                pooled = self.base._avg_pooling(self.base.extract_features(t)).flatten(1).numpy()
                self.cache[key] = {"v_emb": pooled, "v_onnx": self.onnx.run(None, {"pooled": pooled})[0]}
        return self.cache[key][task]

    def answer(self, task: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
        out = np.concatenate([self.row(task, x) for x in pixels])
        if task == "v_emb":
            return {"EMBEDDING": out}
        labels = ONNX_LABELS if task == "v_onnx" else FORK_LABELS
        return {"LOGITS": out, "LABEL": np.array([labels[j].encode() for j in out.argmax(axis=1)], dtype=object)}


class SeriesReference:
    """The documented rules of a series request, and fracast's own model run alone on each row."""

    def __init__(self, base: Any, fine_tuned: Any) -> None:
        self.models = {"s_fc": base, "s_ft": fine_tuned, "s_emb": base}
        self.cache: dict[bytes, np.ndarray] = {}

    def rows(self, task: str, inputs: dict[str, np.ndarray]) -> tuple[str, Any]:
        """("ok", (rows, horizon)) or ("error", why), from the documented rules."""
        horizon, max_horizon, _, min_context, missing = SERIES[task]
        s = inputs.get("SERIES")
        if s is None or s.dtype != np.float32 or s.ndim != 2:
            return "error", "SERIES must be FP32 [rows, T]"
        ln, hz = inputs.get("LENGTHS"), inputs.get("HORIZON")
        if ln is not None and (ln.dtype != np.int64 or ln.ndim != 1):
            return "error", "LENGTHS must be INT64 [rows]"
        if hz is not None and (hz.dtype != np.int64 or hz.shape != (1,)):
            return "error", "HORIZON must be INT64 [1]"
        n, steps = s.shape
        if n < 1 or steps < 1 or n > MAX_SERIES_ROWS or steps > MAX_STEPS:
            return "error", "rows or steps"
        if ln is not None:
            if ln.shape != (n,) or (ln < 1).any() or (ln > steps).any():
                return "error", "LENGTHS"
            ends = [int(x) for x in ln]
        else:
            ends = []
            for r in s:
                present = np.flatnonzero(~np.isnan(r))
                if present.size == 0:
                    return "error", "all NaN"
                ends.append(int(present[-1]) + 1)
        rows = []
        for r, end in zip(s, ends):
            row = r[:end]
            if np.isinf(row).any():
                return "error", "infinite"
            if missing == "reject" and np.isnan(row).any():
                return "error", "NaN inside"
            if int(np.isfinite(row[-WINDOW:]).sum()) < min_context:
                return "error", "too short"
            rows.append(row)
        if horizon is None:
            return ("error", "HORIZON for a task that does not forecast") if hz is not None else ("ok", (rows, None))
        h = horizon if hz is None else int(hz[0])
        if not 1 <= h <= max_horizon:
            return "error", "HORIZON out of range"
        return "ok", (rows, h)

    def forecast(self, task: str, row: np.ndarray, h: int) -> np.ndarray:
        key = _key(task, row, h)
        if key not in self.cache:
            self.cache[key] = self.models[task].forecast_batch(row[None, :], horizon=h)[0]  # [h, 9]
        return self.cache[key]

    def embedding(self, row: np.ndarray) -> np.ndarray:
        key = _key("emb", row)
        if key not in self.cache:
            self.cache[key] = sk.ref_embedding(self.models["s_emb"], [row])[0]
        return self.cache[key]

    def answer(self, task: str, rows: list[np.ndarray], h: int | None) -> dict[str, np.ndarray]:
        if task == "s_emb":
            return {"EMBEDDING": np.stack([self.embedding(r) for r in rows])}
        model = self.models[task]
        with np.errstate(over="ignore"):  # the outputs are FP32: beyond its range is +-inf, as served
            full = np.stack([self.forecast(task, r, h) for r in rows]).astype(np.float32)  # [rows, h, 9]
        qs = SERIES[task][2] or list(model.quantiles)
        return {"FORECAST": full[:, :, model.quantiles.index(0.5)],
                "QUANTILES": full[:, :, [model.quantiles.index(q) for q in qs]]}


# --- calls and checks -----------------------------------------------------------------------------

def assert_refused(got: Any, why: str) -> None:
    assert isinstance(got, str), f"answered a request that must be refused ({why})"
    assert "\n" not in got and "Traceback" not in got, got
    assert got.startswith(("400: ", "StatusCode.INVALID_ARGUMENT: ")), f"{got} (expected a 400 for: {why})"
    event(f"refused: {why}")


def assert_close(name: str, got: np.ndarray, want: np.ndarray) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    finite = np.isfinite(want)
    assert (np.isfinite(got) == finite).all() and (got[~finite] == want[~finite]).all(), f"{name}: non-finite values differ"
    err = np.abs(got[finite] - want[finite])
    assert not (err > ATOL + RTOL * np.abs(want[finite])).any(), f"{name}: max abs error {err.max():.3g}"


def assert_answer(got: Any, want: dict[str, np.ndarray]) -> None:
    assert not isinstance(got, str), f"refused a good request: {got}"
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name, w in want.items():
        if w.dtype == object:
            finite = np.isfinite(want["LOGITS"]).all(axis=1)  # the argmax of a row holding NaN is no label to compare
            assert [x for x, ok in zip(got[name], finite) if ok] == [x for x, ok in zip(w, finite) if ok], name
        else:
            assert_close(name, got[name], w)


def answered_or_refused(server: Server, calls: list[Call], expect: list[tuple[str, Any]]) -> None:
    """Send every call at once; each gets what ``expect`` says: ("error", why) a clear
    refusal, ("ok", outputs) exactly these outputs."""
    results = at_once(server, calls)
    for (verdict, want), got in zip(expect, results):
        if verdict == "error":
            assert_refused(got, want)
        else:
            assert_answer(got, want)
            event("answered")


# --- vision strategies ----------------------------------------------------------------------------

SAVE_MODES = {"PNG": ["RGB", "L", "P", "RGBA", "LA", "1", "I;16"], "JPEG": ["RGB", "L", "CMYK"]}
ODD_SIDES = [1, 2, 3, 223, 224, 225, 255, 256, 257, 300, 601, 611, 700]


def encode(mode: str, w: int, h: int, seed: int, fmt: str, smooth: bool, **opts: Any) -> bytes:
    g = np.random.default_rng(seed)
    bands = {"1": 1, "L": 1, "P": 1, "I;16": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    a = g.integers(0, 256, (h, w, bands), dtype=np.uint8)
    if smooth:
        a = np.cumsum(a, axis=0, dtype=np.uint8)
    if mode == "I;16":
        img = Image.fromarray(a[..., 0].astype(np.uint16) * 257)
    elif bands == 1:
        img = Image.fromarray(a[..., 0], "L").convert(mode)
    else:
        img = Image.fromarray(a, {2: "LA", 3: "RGB", 4: "RGBA"}[bands])
        if mode == "CMYK":
            img = img.convert("CMYK")
    buf = io.BytesIO()
    img.save(buf, fmt, **opts)
    return buf.getvalue()


@st.composite
def good_image(draw: Any) -> bytes:
    fmt = draw(st.sampled_from(["PNG", "JPEG"]))
    mode = draw(st.sampled_from([m for m in SAVE_MODES[fmt] if m not in ("I;16", "CMYK")]))
    side = st.integers(1, 320) | st.sampled_from(ODD_SIDES)
    w, h = draw(side), draw(side)
    opts = {"quality": draw(st.integers(1, 100)), "progressive": draw(st.booleans())} if fmt == "JPEG" else {"compress_level": draw(st.integers(0, 9))}
    return encode(mode, w, h, draw(st.integers(0, 2**16)), fmt, draw(st.booleans()), **opts)


def png_declaring(width: int, height: int) -> bytes:
    """A valid 16x16 PNG whose header is rewritten to declare width x height (CRC fixed)."""
    raw = bytearray(encode("RGB", 16, 16, 0, "PNG", False))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


def jpeg_declaring(width: int, height: int) -> bytes:
    raw = bytearray(encode("RGB", 16, 16, 0, "JPEG", False))
    at = raw.find(b"\xff\xc0")
    raw[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


@st.composite
def image_row(draw: Any) -> bytes:
    """One IMAGE row: a good image, or one broken in a way a client's bug or an attacker would."""
    kind = draw(st.sampled_from(["good", "good", "good", "truncated", "flipped", "random", "foreign", "mode", "declared", "elongated", "empty", "trailing"]))
    event(f"image row: {kind}")
    if kind == "good":
        return draw(good_image())
    if kind == "truncated":
        data = draw(good_image())
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flipped":
        data = bytearray(draw(good_image()))
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "random":
        head = draw(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a"]))
        return head + draw(st.binary(max_size=200))
    if kind == "foreign":
        fmt = draw(st.sampled_from(["GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"]))
        return encode("RGB", draw(st.integers(1, 64)), draw(st.integers(1, 64)), 0, fmt, False)
    if kind == "mode":
        fmt, mode = draw(st.sampled_from([("PNG", "I;16"), ("JPEG", "CMYK")]))
        return encode(mode, draw(st.integers(1, 64)), draw(st.integers(1, 64)), 0, fmt, False)
    if kind == "declared":
        w, h = draw(st.sampled_from([(100_000, 100_000), (8000, 8000), (6400, 6250), (65535, 65535), (2**31 - 1, 1), (0, 16), (3000, 3000)]))
        return (png_declaring if draw(st.booleans()) or w > 65535 or w == 0 else jpeg_declaring)(w, h)
    if kind == "elongated":
        long_side = draw(st.sampled_from([600, 611, 1000, 5000, 100_000]))
        w, h = (1, long_side) if draw(st.booleans()) else (long_side, 1)
        return encode("L", w, h, 0, "PNG", False) if long_side <= 5000 else png_declaring(w, h)
    if kind == "trailing":
        return draw(good_image()) + draw(st.binary(min_size=1, max_size=64))
    return b""


@functools.cache
def pixel_pool() -> np.ndarray:
    """A few preprocessed rows to send as PIXELS (their references are cached after the first use)."""
    digits, _ = digit_images(2, (3, 7))
    return np.stack([VisionReference.pixels(b)[1] for b in photos()[:2] + digits])


@st.composite
def pixels_input(draw: Any) -> tuple[np.ndarray, str | None]:
    """(PIXELS, why it must be refused or None)."""
    n, pool = draw(st.integers(1, 3)), pixel_pool()
    x = pool[draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))].copy()
    kind = draw(st.sampled_from(["good", "good", "nonfinite", "huge", "shape", "dtype", "empty"]))
    event(f"pixels: {kind}")
    if kind == "nonfinite":
        for _ in range(draw(st.integers(1, 4))):
            x[draw(st.integers(0, n - 1)), draw(st.integers(0, 2)), draw(st.integers(0, 223)), draw(st.integers(0, 223))] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf]))
        return x, "non-finite PIXELS"
    if kind == "huge":  # finite: the network's answer, whatever it is, and no effect on the other rows
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, 2)), draw(st.integers(0, 223)), draw(st.integers(0, 223))] = draw(
            st.sampled_from([3e38, -3e38, 1e20, 1e-45]))
        return x, None
    if kind == "shape":
        shape = draw(st.sampled_from([(n, 3, 224, 223), (n, 224, 224, 3), (n, 1, 224, 224), (3, 224, 224), (n, 3, 112, 448), (n, 4, 224, 224)]))
        return np.zeros(shape, dtype=np.float32) + 0.5, "PIXELS of another shape"
    if kind == "dtype":
        return x.astype(draw(st.sampled_from([np.float64, np.float16]))), "PIXELS of another datatype"
    if kind == "empty":
        return np.zeros((0, 3, 224, 224), dtype=np.float32), "0 rows"
    return x, None


@st.composite
def vision_request(draw: Any) -> tuple[str, dict[str, np.ndarray], str | None]:
    """(task, inputs, why it must be refused or None: then the reference decides)."""
    task = draw(st.sampled_from(sorted(VISION)))
    kind = draw(st.sampled_from(["image", "image", "pixels", "pixels", "both", "none", "many", "image_2d"]))
    if kind == "image":
        return task, {"IMAGE": np.array(draw(st.lists(image_row(), min_size=1, max_size=3)), dtype=object)}, None
    if kind == "pixels":
        x, why = draw(pixels_input())
        return task, {"PIXELS": x}, why
    if kind == "both":
        return task, {"IMAGE": np.array([photos()[0]], dtype=object), "PIXELS": pixel_pool()[:1].copy()}, "both inputs"
    if kind == "none":
        return task, {}, "no input"
    if kind == "many":
        return task, {"IMAGE": np.array([b"x"] * (MAX_IMAGE_ROWS + 1), dtype=object)}, "too many rows"
    return task, {"IMAGE": np.array([[photos()[0]]], dtype=object)}, "IMAGE of shape [rows, 1] (the vFM declares [rows])"


def vision_expect(ref: VisionReference, task: str, inputs: dict[str, np.ndarray], why: str | None) -> tuple[str, Any]:
    if why is not None:
        return "error", why
    if "IMAGE" in inputs:
        rows = []
        for data in inputs["IMAGE"]:
            verdict, x = ref.pixels(bytes(data))
            if verdict == "error":
                return "error", f"image: {x}"
            rows.append(x)
        return "ok", ref.answer(task, np.stack(rows))
    return "ok", ref.answer(task, inputs["PIXELS"])


def vision_healthy(served: dict[str, Any]) -> None:
    server: Server = served["server"]
    assert httpclient.InferenceServerClient(server.http_url).is_server_ready()
    got = call(server, "grpc", "v_onnx", {"PIXELS": pixel_pool()[:1].copy()}, VISION["v_onnx"])
    assert_answer(got, served["vision"].answer("v_onnx", pixel_pool()[:1]))


@fuzz
@fuzz_settings(4)
@given(requests=st.lists(vision_request(), min_size=1, max_size=4), proto0=st.integers(0, 1))
@example(requests=[("v_emb", {"IMAGE": np.array([encode("L", 1, 4000, 0, "PNG", False)], dtype=object)}, None),
                   ("v_fork", {"PIXELS": np.full((2, 3, 224, 224), 0.25, dtype=np.float32)}, None)], proto0=0)  # found: a 1x4000 PNG took seconds and a GB to resize
@example(requests=[("v_onnx", {"IMAGE": np.array([encode("RGB", 611, 1, 3, "PNG", False), png_declaring(2**31 - 1, 1), b""], dtype=object)}, None),
                   ("v_emb", {"IMAGE": np.array([encode("P", 601, 1, 4, "PNG", True)], dtype=object)}, None)], proto0=1)
def test_fuzz_vision_inputs_answer_exactly_or_refuse_clearly(served: dict[str, Any], requests: list[Any], proto0: int) -> None:
    ref: VisionReference = served["vision"]
    expect = [vision_expect(ref, task, inputs, why) for task, inputs, why in requests]
    calls = alternating([(task, inputs, VISION[task]) for task, inputs, _ in requests], proto0)
    t0 = time.monotonic()
    answered_or_refused(served["server"], calls, expect)
    event(f"{len(requests)} requests at once took {'under' if time.monotonic() - t0 < 5 else 'over'} 5 s")
    vision_healthy(served)


# --- series strategies ------------------------------------------------------------------------------

@functools.cache
def sources() -> dict[str, np.ndarray]:
    """statsmodels' bundled series (finite ends), and "long": longer than the model's window (2048)."""
    out = {}
    for name in ("sunspots", "co2", "elnino", "nile"):
        s = dd.series(name)
        f = np.flatnonzero(np.isfinite(s))
        out[name] = s[f[0] : f[-1] + 1].copy()
    out["long"] = np.tile(out["sunspots"], 10)
    return out


@st.composite
def series_row(draw: Any) -> np.ndarray:
    kind = draw(st.sampled_from(["source", "source", "long", "constant", "walk", "short"]))
    if kind == "long":
        long = sources()["long"]
        n = draw(st.integers(WINDOW - 10, min(len(long), WINDOW + 600)))
        row = long[-n:].copy()
    elif kind == "constant":
        row = np.full(draw(st.integers(1, 200)), draw(st.sampled_from([0.0, -1.0, 1e6, 3e38])), dtype=np.float32)
    elif kind == "walk":
        g = np.random.default_rng(draw(st.integers(0, 2**16)))
        row = np.cumsum(g.standard_normal(draw(st.integers(1, 300))) * draw(st.sampled_from([1e-6, 1.0, 1e10]))).astype(np.float32)
    elif kind == "short":
        row = sources()["nile"][: draw(st.integers(1, 40))].copy()
    else:
        src = sources()[draw(st.sampled_from(["co2", "elnino", "nile", "sunspots"]))]
        n = draw(st.integers(1, min(400, len(src))))
        at = draw(st.integers(0, len(src) - n))
        row = src[at : at + n].copy()
    holes = draw(st.sampled_from(["none", "none", "nan_inside", "nan_lead", "nan_many", "inf", "all_nan", "huge"]))
    if holes != "none":
        event(f"series row: {holes}")
    if holes == "nan_inside" and len(row) > 2:
        for _ in range(draw(st.integers(1, 5))):
            row[draw(st.integers(1, len(row) - 2))] = np.nan
    elif holes == "nan_lead":
        row[: draw(st.integers(1, len(row)))] = np.nan
    elif holes == "nan_many":
        row[np.random.default_rng(draw(st.integers(0, 99))).random(len(row)) < draw(st.sampled_from([0.5, 0.9, 0.99]))] = np.nan
    elif holes == "inf":
        row[draw(st.integers(0, len(row) - 1))] = draw(st.sampled_from([np.inf, -np.inf]))
    elif holes == "all_nan":
        row[:] = np.nan
    elif holes == "huge":
        row[draw(st.integers(0, len(row) - 1))] = draw(st.sampled_from([3.0e38, -3.0e38, 1e30]))
    return row


@st.composite
def series_request(draw: Any) -> tuple[str, dict[str, np.ndarray]]:
    task = draw(st.sampled_from(sorted(SERIES)))
    rows = draw(st.lists(series_row(), min_size=1, max_size=3))
    pad = draw(st.sampled_from([0, 0, 0, 3]))
    steps = max(len(r) for r in rows) + pad
    s = np.full((len(rows), steps), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        s[i, : len(r)] = r
    inputs: dict[str, np.ndarray] = {"SERIES": s}
    lengths = draw(st.sampled_from(["none", "none", "exact", "shorter", "zero", "over", "count", "int32", "2d"]))
    if lengths != "none":
        event(f"LENGTHS: {lengths}")
    exact = np.array([len(r) for r in rows], dtype=np.int64)
    if lengths == "exact":
        inputs["LENGTHS"] = exact
    elif lengths == "shorter":
        inputs["LENGTHS"] = np.maximum(1, exact - draw(st.integers(1, 50)))
    elif lengths == "zero":
        inputs["LENGTHS"] = np.where(np.arange(len(rows)) == 0, draw(st.sampled_from([0, -1, -(2**62)])), exact).astype(np.int64)
    elif lengths == "over":
        inputs["LENGTHS"] = exact + draw(st.sampled_from([pad + 1, 2**40]))
    elif lengths == "count":
        inputs["LENGTHS"] = np.concatenate([exact, exact[:1]])
    elif lengths == "int32":
        inputs["LENGTHS"] = exact.astype(np.int32)
    elif lengths == "2d":
        inputs["LENGTHS"] = exact[:, None]
    horizon = draw(st.sampled_from(["none", "none", "in", "edge", "zero", "over", "two", "int32", "huge"]))
    if horizon != "none":
        event(f"HORIZON: {horizon}")
    if horizon == "in":
        inputs["HORIZON"] = np.array([draw(st.integers(1, 96))], dtype=np.int64)
    elif horizon == "edge":
        inputs["HORIZON"] = np.array([draw(st.sampled_from([1, 48, 49, 96, 97, 120, 121]))], dtype=np.int64)
    elif horizon == "zero":
        inputs["HORIZON"] = np.array([draw(st.sampled_from([0, -1, -(2**63)]))], dtype=np.int64)
    elif horizon == "huge":
        inputs["HORIZON"] = np.array([draw(st.sampled_from([481, 2**31, 2**63 - 1]))], dtype=np.int64)
    elif horizon == "two":
        inputs["HORIZON"] = np.array([24, 24], dtype=np.int64)
    elif horizon == "int32":
        inputs["HORIZON"] = np.array([24], dtype=np.int32)
    shape = draw(st.sampled_from(["ok"] * 8 + ["fp64", "fp16", "1d", "3d", "no_steps", "no_rows", "too_many_steps"]))
    if shape != "ok":
        event(f"SERIES: {shape}")
    if shape == "fp64":
        inputs["SERIES"] = s.astype(np.float64)
    elif shape == "fp16":
        with np.errstate(over="ignore"):  # refused by its datatype, whatever the values became
            inputs["SERIES"] = s.astype(np.float16)
    elif shape == "1d":
        inputs["SERIES"] = s[0]
    elif shape == "3d":
        inputs["SERIES"] = s[:, None, :]
    elif shape == "no_steps":
        inputs["SERIES"] = np.zeros((len(rows), 0), dtype=np.float32)
    elif shape == "no_rows":
        inputs["SERIES"] = np.zeros((0, 16), dtype=np.float32)
    elif shape == "too_many_steps":
        inputs["SERIES"] = np.concatenate([np.full((len(rows), MAX_STEPS + 1 - steps), 1.0, np.float32), s], axis=1)
    return task, inputs


def series_healthy(served: dict[str, Any]) -> None:
    server: Server = served["server"]
    assert httpclient.InferenceServerClient(server.http_url).is_server_ready()
    row = sources()["elnino"][:96].copy()
    got = call(server, "http", "s_fc", {"SERIES": row[None]}, SERIES_OUT["s_fc"])
    assert_answer(got, served["series"].answer("s_fc", [row], 24))


@fuzz
@fuzz_settings(6)
@given(requests=st.lists(series_request(), min_size=1, max_size=4), proto0=st.integers(0, 1))
@example(requests=[("s_emb", {"SERIES": np.array([[1.0] * 31 + [np.nan] * 2], dtype=np.float32)}),  # too short for min_context 32
                   ("s_fc", {"SERIES": np.array([[np.nan, 1, 2, 3, 4, 5, 6, 7, 8, np.nan]], dtype=np.float32),
                             "HORIZON": np.array([120], dtype=np.int64)}),
                   ("s_ft", {"SERIES": np.array([[3e38, -3e38] * 20], dtype=np.float32), "LENGTHS": np.array([40], dtype=np.int64)})],
         proto0=0)
def test_fuzz_series_inputs_answer_exactly_or_refuse_clearly(served: dict[str, Any], requests: list[Any], proto0: int) -> None:
    ref: SeriesReference = served["series"]
    expect = []
    for task, inputs in requests:
        verdict, what = ref.rows(task, inputs)
        expect.append((verdict, what if verdict == "error" else ref.answer(task, *what)))
    calls = alternating([(task, inputs, SERIES_OUT[task]) for task, inputs in requests], proto0)
    answered_or_refused(served["server"], calls, expect)
    series_healthy(served)
