"""``fmplex perf``: Triton's perf_analyzer against deployed vFMs, in one step.

perf_analyzer ships in tritonclient's wheel (``tritonclient[all]`` puts it in
the venv's ``bin/``) but does not run from there as it is: it links to
``libcudart.so.12`` (PyPI ``nvidia-cuda-runtime-cu12``, whose ``lib/`` must be
on ``LD_LIBRARY_PATH``) and to Debian's ``libb64-0d``. And a vFM's ``TEXT``
input is BYTES of variable length, which perf_analyzer can neither invent
(random bytes are not UTF-8) nor size (``--shape``). This module finds the
binary and its library path, writes a realistic ``--input-data`` file for each
model from the model's own config, runs one perf_analyzer per model at the
same time (the multi-task load fmplex is for), and sums what they measured.

Input data is made per *input family*: a small registry of functions, each
claiming the models whose inputs it knows how to fill (text sentences;
generative prompts with ``MAX_TOKENS``; multimodal prompts with an image).
A new family (vision pixels, time series) adds its inputs with one
``@input_family(...)`` function; nothing else here changes. A model config
may also name its family outright with a ``fmplex_family`` parameter.

Control-plane code: nothing here is imported by a serving process.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

FAMILY_PARAMETER = "fmplex_family"  # optional vFM config parameter naming its input family


class PerfError(RuntimeError):
    """perf_analyzer cannot be run as asked (not installed, unknown model), or failed."""

    def __init__(self, message: str, returncode: int = 1) -> None:
        super().__init__(message)
        self.returncode = returncode


# --- the binary and its library path ----------------------------------------------------


def cuda_runtime_lib() -> Path | None:
    """``lib/`` of the pip-installed CUDA runtime (libcudart.so.12), if installed."""
    try:
        import nvidia.cuda_runtime  # noqa: PLC0415 - only to locate its files
    except ImportError:
        return None
    return Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"


def perf_analyzer_command() -> tuple[list[str], dict[str, str]]:
    """perf_analyzer from tritonclient's wheel and the environment it runs in
    (the cudart it links to on ``LD_LIBRARY_PATH``).

    It also needs Debian's libb64-0d (``make system-deps`` installs it).
    """
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        raise PerfError("perf_analyzer not found next to this interpreter: install tritonclient[all]==2.51.0")
    env = os.environ.copy()
    lib = cuda_runtime_lib()
    if lib is not None:
        env["LD_LIBRARY_PATH"] = str(lib) + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return [str(binary)], env


def _missing_library_hint(output: str) -> str:
    """A fix for the loader errors a fresh install meets, or ''."""
    if "libb64" in output:
        return "perf_analyzer needs Debian's libb64-0d: run 'make system-deps' (or apt-get install libb64-0d)"
    if "libcudart" in output:
        return "perf_analyzer needs libcudart.so.12: pip install nvidia-cuda-runtime-cu12 (fmplex puts its lib/ on LD_LIBRARY_PATH)"
    return ""


# --- what a model takes -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton config type, e.g. TYPE_STRING
    dims: tuple[int, ...]
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class ModelSignature:
    """What perf input generation needs from a model's config: its inputs,
    parameters, and the configs of the models it runs on (an ensemble's steps,
    and models its parameters name, as a multimodal lm stage names its
    encoder), where the sizes an ensemble leaves open are fixed."""

    name: str
    inputs: dict[str, TensorSpec]
    parameters: dict[str, str]
    decoupled: bool = False
    uses: tuple[str, ...] = ()  # names of the models it runs on
    composing: dict[str, ModelSignature] = dataclasses.field(default_factory=dict)  # filled by fetch_signatures

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSignature:
        """From Triton's model config as JSON (HTTP, or gRPC ``as_json``: dims as strings)."""
        config = config.get("config", config)
        inputs = {
            t["name"]: TensorSpec(t["name"], t.get("data_type", ""), tuple(int(d) for d in t.get("dims", [])), bool(t.get("optional", False)))
            for t in config.get("input", [])
        }
        params = {k: str(v.get("string_value", "")) for k, v in (config.get("parameters") or {}).items()}
        decoupled = bool((config.get("model_transaction_policy") or {}).get("decoupled", False))
        steps = [st.get("model_name", "") for st in (config.get("ensemble_scheduling") or {}).get("step", [])]
        named = [v for k, v in sorted(params.items()) if k.endswith("_model") and v]
        uses = tuple(dict.fromkeys(m for m in steps + named if m))
        return cls(config.get("name", ""), inputs, params, decoupled, uses)

    def has(self, name: str, data_type: str | None = None) -> bool:
        spec = self.inputs.get(name)
        return spec is not None and (data_type is None or spec.data_type == data_type)

    def find_input(self, name: str) -> TensorSpec | None:
        """``name`` among the inputs of this model or of any model it runs on."""
        if name in self.inputs:
            return self.inputs[name]
        for sub in self.composing.values():
            found = sub.find_input(name)
            if found is not None:
                return found
        return None


def _client(url: str, protocol: str) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        return grpcclient.InferenceServerClient(url)
    import tritonclient.http as httpclient  # noqa: PLC0415

    return httpclient.InferenceServerClient(url, connection_timeout=10, network_timeout=30)


def fetch_signatures(url: str, protocol: str, models: Iterable[str]) -> dict[str, ModelSignature | None]:
    """Each model's config from the server (config reads stay open on a locked
    server); None for a model it does not serve."""
    from tritonclient.utils import InferenceServerException  # noqa: PLC0415

    client = _client(url, protocol)
    try:
        try:
            live = bool(client.is_server_live())
        except (InferenceServerException, OSError) as exc:
            raise PerfError(f"no tritonserver answers {protocol} at {url} (start one with 'fmplex serve'): {exc}") from None
        if not live:
            raise PerfError(f"the tritonserver at {url} is not live")
        out: dict[str, ModelSignature | None] = {}
        for model in models:
            try:
                config = client.get_model_config(model, as_json=True) if protocol == "grpc" else client.get_model_config(model)
            except InferenceServerException:
                out[model] = None
                continue
            out[model] = ModelSignature.from_config(config)
        cache: dict[str, ModelSignature | None] = dict(out)

        def resolve(sig: ModelSignature, depth: int) -> None:
            for name in sig.uses if depth < 3 else ():
                if name not in cache:
                    try:
                        cfg = client.get_model_config(name, as_json=True) if protocol == "grpc" else client.get_model_config(name)
                        cache[name] = ModelSignature.from_config(cfg)
                    except InferenceServerException:
                        cache[name] = None
                sub = cache[name]
                if sub is not None and sub is not sig:
                    sig.composing[name] = sub
                    resolve(sub, depth + 1)

        for sig in out.values():
            if sig is not None:
                resolve(sig, 0)
        return out
    finally:
        client.close()


# --- input data per family -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """What a user may tune about the generated requests."""

    rows: int = 1  # rows (sentences) per request, for families that batch rows
    max_tokens: int = 16  # new tokens per generative request
    seed: int = 0


@dataclasses.dataclass
class InputData:
    """One ``--input-data`` file's content and the ``--shape`` options it needs."""

    data: list[dict[str, Any]]  # perf_analyzer's "data" list: one request per entry, cycled
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data}

    def shape_args(self) -> list[str]:
        return [arg for name, shape in self.shapes.items() for arg in ("--shape", f"{name}:{','.join(map(str, shape))}")]


InputMaker = Callable[[ModelSignature, InputOptions], InputData]


@dataclasses.dataclass(frozen=True)
class InputFamily:
    name: str
    claims: Callable[[ModelSignature], bool]
    make: InputMaker


INPUT_FAMILIES: dict[str, InputFamily] = {}  # in registration order: the first that claims a model wins


def input_family(name: str, claims: Callable[[ModelSignature], bool]) -> Callable[[InputMaker], InputMaker]:
    """Register how perf requests for one family of models are made.

    ``claims`` says from a model's inputs whether the family applies (register
    the more specific families first); a config parameter ``fmplex_family``
    naming the family overrides it.
    """

    def register(make: InputMaker) -> InputMaker:
        INPUT_FAMILIES[name] = InputFamily(name, claims, make)
        return make

    return register


def family_of(sig: ModelSignature) -> InputFamily:
    named = sig.parameters.get(FAMILY_PARAMETER)
    if named and named in INPUT_FAMILIES:
        return INPUT_FAMILIES[named]
    for family in INPUT_FAMILIES.values():
        if family.claims(sig):
            return family
    ins = ", ".join(f"{t.name} {t.data_type} {list(t.dims)}" for t in sig.inputs.values()) or "none"
    raise PerfError(
        f"no perf input generator for model '{sig.name}' (inputs: {ins}); pass your own with --input-data FILE, "
        f"or register one with @input_family in {__name__}"
    )


def make_input_data(sig: ModelSignature, options: InputOptions) -> InputData:
    return family_of(sig).make(sig, options)


# Sentences of several lengths (roughly 4 to 70 words): what a text task meets,
# and what makes padding and length bucketing in the host do real work.
SENTENCES = (
    "Thanks, that was quick.",
    "The service was quick and the food arrived hot.",
    "My order arrived two days late and the box was damaged, so I would like a refund please.",
    "Could you book a table for four people tomorrow at eight, preferably near the window, "
    "and let me know if they have vegetarian options on the menu?",
    "I have been a customer for almost ten years and I have never had a problem until last month, when "
    "the new billing system charged me twice for the same subscription; support told me it would be fixed "
    "within a week, but three weeks later I am still waiting for the money and nobody answers my emails.",
    "Battery life is great.",
    "The update broke the login screen on my phone, and now the app crashes every time I open it.",
    "What time does the museum open on Sundays?",
)

PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in one paragraph why the sky is blue, as you would to a curious ten-year-old who keeps asking why.",
    "def fibonacci(n):",
    "Summarize the following review in one sentence: the hotel room was small but very clean, the staff were "
    "friendly and helpful, breakfast was excellent, and the location could not have been better for sightseeing.",
    "Once upon a time,",
)


def _bytes_tensor(values: list[str]) -> dict[str, Any]:
    return {"content": values, "shape": [len(values)]}


def _scalar(value: int | float) -> dict[str, Any]:
    return {"content": [value], "shape": [1]}


@input_family("generative", lambda s: s.has("TEXT", "TYPE_STRING") and s.has("MAX_TOKENS"))
def generative_inputs(sig: ModelSignature, options: InputOptions) -> InputData:
    """One prompt per request (prompts of several lengths) and its MAX_TOKENS."""
    data = [{"TEXT": _bytes_tensor([p]), "MAX_TOKENS": _scalar(options.max_tokens)} for p in PROMPTS]
    return InputData(data, {"TEXT": [1]} if -1 in sig.inputs["TEXT"].dims else {})


def _pixels(shape: list[int], seed: int) -> dict[str, Any]:
    """An FP32 tensor of normalized-looking pixels (mean 0, std 1), base64 as perf_analyzer reads it."""
    import base64  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    data = np.random.default_rng(seed).standard_normal(shape).astype("<f4")
    return {"b64": base64.b64encode(data.tobytes()).decode("ascii"), "shape": shape}


IMAGE_PROMPTS = ("What is shown?", "Describe this picture in one sentence.", "<image>\nWhat colours dominate this image, and where?")


@input_family("multimodal", lambda s: s.has("TEXT", "TYPE_STRING") and s.has("IMAGES") and s.has("MAX_NEW_TOKENS"))
def multimodal_inputs(sig: ModelSignature, options: InputOptions) -> InputData:
    """One image and a question per request, at the encoder's image size
    (its PIXEL_VALUES [C, H, W], found through the models the vFM runs on).
    Text-only prompts when no encoder says its size."""
    pixels = sig.find_input("PIXEL_VALUES")
    text_shape = {"TEXT": [1]} if -1 in sig.inputs["TEXT"].dims else {}
    if pixels is None or len(pixels.dims) != 3 or min(pixels.dims) < 1:
        data = [{"TEXT": _bytes_tensor([p]), "MAX_NEW_TOKENS": _scalar(options.max_tokens)} for p in PROMPTS]
        return InputData(data, text_shape)
    shape = [1, *pixels.dims]
    data = [
        {"TEXT": _bytes_tensor([p]), "IMAGES": _pixels(shape, options.seed + i), "MAX_NEW_TOKENS": _scalar(options.max_tokens)}
        for i, p in enumerate(IMAGE_PROMPTS)
    ]
    return InputData(data, {**text_shape, "IMAGES": shape})


@input_family("images", lambda s: s.has("PIXELS", "TYPE_FP32"))
def image_inputs(sig: ModelSignature, options: InputOptions) -> InputData:
    """``rows`` preprocessed images per request (PIXELS [rows, 3, 224, 224]): the
    host's own decode of encoded images is left out, the backbone pass is measured."""
    dims = [d if d > 0 else 224 for d in sig.inputs["PIXELS"].dims[1:]] or [3, 224, 224]
    shape = [options.rows, *dims]
    data = [{"PIXELS": _pixels(shape, options.seed + i)} for i in range(4)]
    return InputData(data, {"PIXELS": shape})


SERIES_STEPS = 256  # steps per perf series row: a context of some length, one trunk round


def _series(rows: int, steps: int, seed: int) -> dict[str, Any]:
    """FP32 series (a noisy seasonal signal), base64 as perf_analyzer reads it."""
    import base64  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    t = np.arange(steps, dtype=np.float64)
    g = np.random.default_rng(seed)
    data = np.stack([10 + 3 * np.sin(2 * np.pi * t / (12 + 4 * k)) + g.standard_normal(steps) for k in range(rows)]).astype("<f4")
    return {"b64": base64.b64encode(data.tobytes()).decode("ascii"), "shape": [rows, steps]}


@input_family("series", lambda s: s.has("SERIES", "TYPE_FP32"))
def series_inputs(sig: ModelSignature, options: InputOptions) -> InputData:
    """``rows`` series of 256 steps per request; the task's default horizon (no HORIZON, no LENGTHS)."""
    data = [{"SERIES": _series(options.rows, SERIES_STEPS, options.seed + i)} for i in range(4)]
    return InputData(data, {"SERIES": [options.rows, SERIES_STEPS]})


@input_family("text", lambda s: s.has("TEXT", "TYPE_STRING"))
def text_inputs(sig: ModelSignature, options: InputOptions) -> InputData:
    """``rows`` sentences per request, cycling through sentences of several lengths."""
    n = len(SENTENCES)
    data = [{"TEXT": _bytes_tensor([SENTENCES[(i + k) % n] for k in range(options.rows)])} for i in range(n)]
    return InputData(data, {"TEXT": [options.rows]} if -1 in sig.inputs["TEXT"].dims else {})


def text_input_file(path: Path, texts: list[str]) -> Path:
    """A perf_analyzer --input-data file with one TEXT request of these rows."""
    path.write_text(json.dumps(InputData([{"TEXT": _bytes_tensor(texts)}]).to_json()))
    return path


# --- running perf_analyzer -----------------------------------------------------------------


@dataclasses.dataclass
class PerfOptions:
    """perf_analyzer options passed through (None: perf_analyzer's default)."""

    url: str
    protocol: str = "grpc"
    concurrency_range: str | None = None
    request_rate_range: str | None = None
    measurement_interval_ms: int | None = None
    measurement_mode: str | None = None
    measurement_request_count: int | None = None
    request_count: int | None = None
    percentile: int | None = None
    stability_percentage: float | None = None
    max_trials: int | None = None
    csv_file: Path | None = None  # the user's -f report
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        out = ["-u", self.url, "-i", self.protocol]
        pairs = (
            ("--concurrency-range", self.concurrency_range),
            ("--request-rate-range", self.request_rate_range),
            ("--measurement-interval", self.measurement_interval_ms),
            ("--measurement-mode", self.measurement_mode),
            ("--measurement-request-count", self.measurement_request_count),
            ("--request-count", self.request_count),
            ("--percentile", self.percentile),
            ("--stability-percentage", self.stability_percentage),
            ("--max-trials", self.max_trials),
        )
        for flag, value in pairs:
            if value is not None:
                out += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return out + list(self.extra)


@dataclasses.dataclass
class PerfTarget:
    """One perf_analyzer run: a model and its input file."""

    model: str
    family: str
    input_file: Path
    shape_args: list[str]
    streaming: bool


@dataclasses.dataclass
class PerfResult:
    model: str
    family: str
    command: list[str]
    returncode: int
    output: str  # stdout + stderr, as perf_analyzer printed them
    rows: list[dict[str, str]]  # its CSV report, one row per load level
    requests: list[dict[str, Any]]  # its profile export: one entry per measured request
    streaming: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.rows)

    @property
    def throughputs(self) -> list[float]:
        return [float(r["Inferences/Second"]) for r in self.rows]

    @property
    def request_counts(self) -> list[int]:
        """Requests measured at each load level (what its statistics report)."""
        return [int(m) for m in re.findall(r"^\s*Request count: (\d+)", self.output, re.M)]

    def first_response_ms(self) -> list[float]:
        """Time to first response of each measured request, in ms (streaming)."""
        return [(r["response_timestamps"][0] - r["timestamp"]) / 1e6 for r in self.requests if r.get("response_timestamps")]

    def error(self) -> str:
        """perf_analyzer's own error lines (what a user must see when it fails)."""
        text = self.output.strip()
        hint = _missing_library_hint(text) if "error while loading shared libraries" in text else ""
        if "Failed to obtain stable measurement" in text:
            hint = ("no stable window on this machine: allow more variation (-s 50), longer windows (-p 10000), "
                    "or send a fixed number of requests (--request-count N)")
        text = text.split("\nUsage:", 1)[0]  # a bad option: the error, then its whole --help
        lines = [ln.strip() for ln in text.splitlines() if re.match(r"\s*(error|failed|unable|thread \[\d+\] had error)", ln, re.I)]
        body = "\n".join(lines[-10:] or text.splitlines()[-10:]) or f"perf_analyzer exited with status {self.returncode}"
        return body + (f"\n{hint}" if hint else "")


def load_label(row: dict[str, str]) -> str:
    if "Request Rate" in row:
        return f"rate {row['Request Rate']}/s"
    return f"concurrency {row.get('Concurrency', '?')}"


def prepare(
    names: Iterable[str],
    url: str,
    protocol: str,
    out_dir: Path,
    options: InputOptions,
    streaming: bool = False,
    input_file: Path | None = None,
) -> list[PerfTarget]:
    """Resolve each name to the model to measure and write its input file.

    ``streaming`` measures a generative task's ``NAME.stream`` twin over a gRPC
    stream; a decoupled model named directly is streamed anyway (it refuses
    plain infer).
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise PerfError("a model is named twice")
    if streaming:
        from fmplex.backbones import STREAM_SUFFIX  # noqa: PLC0415 - light (no torch)

        wanted = {n: n if n.endswith(STREAM_SUFFIX) else n + STREAM_SUFFIX for n in names}
    else:
        wanted = {n: n for n in names}
    sigs = fetch_signatures(url, protocol, sorted(set(wanted.values()) | set(names)))
    targets = []
    for name in names:
        sig = sigs[wanted[name]]
        if sig is None or (streaming and not sig.decoupled):
            if sigs[name] is None:
                raise PerfError(f"model '{name}' is not served at {url} (deployed? see 'fmplex status')")
            raise PerfError(f"--streaming: '{name}' has no streaming twin '{wanted[name]}' at {url} (only generative tasks stream)")
        if sig.decoupled and protocol != "grpc":
            raise PerfError(f"'{sig.name}' streams (decoupled): perf_analyzer streams over gRPC only; use --protocol grpc")
        if input_file is not None:
            targets.append(PerfTarget(sig.name, "given", input_file, given_shape_args(sig, input_file), sig.decoupled))
            continue
        family = family_of(sig)
        data = family.make(sig, options)
        path = out_dir / f"{sig.name}.json"
        path.write_text(json.dumps(data.to_json(), indent=1) + "\n")
        targets.append(PerfTarget(sig.name, family.name, path, data.shape_args(), sig.decoupled))
    return targets


def given_shape_args(sig: ModelSignature, input_file: Path) -> list[str]:
    """``--shape`` for the variable-sized inputs of ``sig`` that the first
    request of a user's input file sizes (perf_analyzer insists on them)."""
    try:
        first = json.loads(input_file.read_text())["data"][0]
    except OSError as exc:
        raise PerfError(f"--input-data {input_file}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise PerfError(f"--input-data {input_file}: not a perf_analyzer input file ({{\"data\": [{{INPUT: ...}}, ...]}})") from None
    if isinstance(first, list):  # a sequence stream: its first step
        first = first[0] if first else {}
    shapes = {}
    for name, spec in sig.inputs.items():
        value = first.get(name) if isinstance(first, dict) else None
        if -1 in spec.dims and isinstance(value, dict) and isinstance(value.get("shape"), list):
            shapes[name] = value["shape"]
    return InputData([], shapes).shape_args()


def _csv_path(base: Path | None, model: str, several: bool, work: Path) -> Path:
    """Where one run's CSV goes: the user's -f file (one model), FILE.MODEL.csv
    beside it (several), or a scratch file."""
    if base is None:
        return work / f"{model}.csv"
    if not several:
        return base
    return base.with_name(f"{base.stem}.{model}{base.suffix or '.csv'}")


def command_line(target: PerfTarget, options: PerfOptions, csv_file: Path, export: Path) -> list[str]:
    cmd, _env = perf_analyzer_command()
    args = [*cmd, "-m", target.model, *options.args(), "--input-data", str(target.input_file), *target.shape_args, "-f", str(csv_file)]
    if target.streaming:  # the profile export holds each response's timestamp: time to first response
        args += ["--streaming", "--profile-export-file", str(export)]
    return args


def shell_line(args: list[str]) -> str:
    """The command as a user can paste it, library path included."""
    lib = cuda_runtime_lib()
    prefix = f"LD_LIBRARY_PATH={shlex.quote(str(lib))} " if lib is not None else ""
    return prefix + shlex.join(args)


def _read_csv(path: Path) -> list[dict[str, str]]:
    """perf_analyzer's -f report: one row per load level (the first block;
    --verbose-csv may append more after a blank line)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    block = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    return [row for row in csv.DictReader(block.splitlines()) if row.get("Inferences/Second")]


def _read_export(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [r for exp in doc.get("experiments", []) for r in exp.get("requests", [])]


def run(
    targets: list[PerfTarget],
    options: PerfOptions,
    work: Path,
    echo: Callable[[str], None] = print,
    live: TextIO | None = None,
    timeout: float | None = None,
) -> list[PerfResult]:
    """One perf_analyzer per target, all at the same time; their results.

    With one target and ``live`` set, perf_analyzer's output is copied there as
    it comes (a long run shows progress); otherwise each output is returned.
    """
    _cmd, env = perf_analyzer_command()
    several = len(targets) > 1
    runs = []
    for t in targets:
        csv_file = _csv_path(options.csv_file, t.model, several, work)
        export = work / f"{t.model}.profile.json"
        args = command_line(t, options, csv_file, export)
        echo(f"$ {shell_line(args)}")
        try:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace")
        except OSError as exc:
            for _t, p, *_ in runs:
                p.kill()
            raise PerfError(f"cannot start perf_analyzer: {exc}") from None
        runs.append((t, proc, args, csv_file, export))

    outputs: dict[str, list[str]] = {t.model: [] for t in targets}

    def pump(model: str, stream: TextIO) -> None:
        for line in stream:
            outputs[model].append(line)
            if live is not None and not several:
                live.write(line)
                live.flush()

    threads = [threading.Thread(target=pump, args=(t.model, p.stdout), daemon=True) for t, p, *_ in runs]
    for th in threads:
        th.start()
    results = []
    try:
        for (t, proc, args, csv_file, export), th in zip(runs, threads):
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                outputs[t.model].append(f"\nerror: perf_analyzer on {t.model} ran past {timeout:.0f} s and was stopped\n")
            th.join(timeout=10)
            results.append(PerfResult(t.model, t.family, args, rc, "".join(outputs[t.model]), _read_csv(csv_file), _read_export(export), t.streaming))
    finally:
        for _t, proc, *_ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(results: list[PerfResult]) -> list[str]:
    """The lines ``fmplex perf`` prints after perf_analyzer's own tables: per
    model and load level its throughput and request count, time to first
    response when streaming, and with several models their sum per level."""
    lines = ["== fmplex perf summary"]
    width = max(12, *(len(r.model) for r in results))
    levels = max(len(r.rows) for r in results)
    for r in results:
        counts = r.request_counts
        for i, row in enumerate(r.rows):
            p99 = row.get("p99 latency")
            line = f"  {r.model:<{width}} {load_label(row):<18} {float(row['Inferences/Second']):10.2f} infer/s"
            if i < len(counts):
                line += f"  {counts[i]:6d} requests"
            if p99:
                line += f"  p99 {int(p99) / 1000:9.1f} ms"
            lines.append(line)
        ttft = r.first_response_ms()
        if r.streaming and ttft:
            lines.append(
                f"  {r.model:<{width}} time to first response: avg {statistics.fmean(ttft):.1f} ms, p50 {_ms(ttft, 50):.1f} ms, "
                f"p99 {_ms(ttft, 99):.1f} ms over {len(ttft)} requests"
            )
    if len(results) > 1:
        for i in range(levels):
            per = [r.rows[i] for r in results if i < len(r.rows)]
            total = sum(float(row["Inferences/Second"]) for row in per)
            lines.append(f"  {'sum of ' + str(len(per)):<{width}} {load_label(per[0]):<18} {total:10.2f} infer/s")
    return lines


def default_url(protocol: str) -> str:
    """``fmplex serve``'s endpoints: gRPC on 8001, HTTP on 8000."""
    return "localhost:8001" if protocol == "grpc" else "localhost:8000"


def perf(
    names: list[str],
    options: PerfOptions,
    inputs: InputOptions,
    streaming: bool = False,
    input_file: Path | None = None,
    write_input_data: Path | None = None,
    echo: Callable[[str], None] = print,
    live: TextIO | None = None,
) -> list[PerfResult]:
    """Prepare inputs, run, print each perf_analyzer's table and the summary.

    Raises PerfError when any run fails, with perf_analyzer's own error.
    """
    perf_analyzer_command()  # not installed: say so before asking the server anything
    with tempfile.TemporaryDirectory(prefix="fmplex-perf-") as tmp:
        work = Path(tmp)
        data_dir = work
        if write_input_data is not None:
            write_input_data.mkdir(parents=True, exist_ok=True)
            data_dir = write_input_data
        targets = prepare(names, options.url, options.protocol, data_dir, inputs, streaming, input_file)
        for t in targets:
            if write_input_data is not None:
                echo(f"input data for {t.model} ({t.family}): {t.input_file}")
        results = run(targets, options, work, echo=echo, live=live)
    several = len(results) > 1
    for r in results:
        if several or live is None:
            echo(f"== perf_analyzer {r.model}")
            echo(r.output.rstrip())
    failed = [r for r in results if not r.ok]
    if failed:
        raise PerfError(
            "\n".join(f"perf_analyzer failed on {r.model} (exit {r.returncode}):\n{r.error()}" for r in failed),
            returncode=next((r.returncode for r in failed if r.returncode), 1),
        )
    for line in summary(results):
        echo(line)
    return results
