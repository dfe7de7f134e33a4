"""``fmplex perf`` without a server: input data per family, result parsing, the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from fmplex.control import perf
from fmplex.control.cli import main

TEXT_VFM = {  # as tritonclient.http returns it (dims as numbers)
    "name": "sentiment",
    "platform": "ensemble",
    "input": [
        {"name": "TEXT", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
        {"name": "INPUT_IDS", "data_type": "TYPE_INT64", "dims": [-1, -1], "optional": True},
    ],
    "parameters": {"fmplex_task": {"string_value": "sentiment"}, "fmplex_kind": {"string_value": "classifier"}},
}
GEN_VFM = {  # as tritonclient.grpc returns it with as_json=True (dims as strings)
    "config": {
        "name": "chat.stream",
        "input": [
            {"name": "TEXT", "data_type": "TYPE_STRING", "dims": ["-1"]},
            {"name": "MAX_TOKENS", "data_type": "TYPE_INT32", "dims": ["1"], "optional": True},
            {"name": "SEED", "data_type": "TYPE_INT64", "dims": ["1"], "optional": True},
        ],
        "parameters": {"fmplex_kind": {"string_value": "generate"}},
        "model_transaction_policy": {"decoupled": True},
    }
}
MULTIMODAL_VFM = {
    "name": "caption",
    "input": [
        {"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]},
        {"name": "IMAGES", "data_type": "TYPE_FP32", "dims": [-1, -1, -1, -1], "optional": True},
        {"name": "MAX_NEW_TOKENS", "data_type": "TYPE_INT32", "dims": [1], "optional": True},
    ],
}


def test_signature_from_either_protocol() -> None:
    text = perf.ModelSignature.from_config(TEXT_VFM)
    gen = perf.ModelSignature.from_config(GEN_VFM)
    assert text.name == "sentiment" and text.inputs["TEXT"].dims == (-1,) and text.inputs["TEXT"].optional
    assert not text.decoupled and text.parameters["fmplex_kind"] == "classifier"
    assert gen.name == "chat.stream" and gen.decoupled and gen.inputs["MAX_TOKENS"].dims == (1,)


def test_family_chosen_from_the_inputs() -> None:
    assert perf.family_of(perf.ModelSignature.from_config(TEXT_VFM)).name == "text"
    assert perf.family_of(perf.ModelSignature.from_config(GEN_VFM)).name == "generative"
    assert perf.family_of(perf.ModelSignature.from_config(MULTIMODAL_VFM)).name == "multimodal"


def test_multimodal_images_take_the_encoders_size() -> None:
    import base64

    import numpy as np

    vfm = json.loads(json.dumps(MULTIMODAL_VFM))
    vfm["ensemble_scheduling"] = {"step": [{"model_name": "fm.llava-tiny.lm"}]}
    sig = perf.ModelSignature.from_config(vfm)
    assert sig.uses == ("fm.llava-tiny.lm",)
    lm = perf.ModelSignature.from_config({"name": "fm.llava-tiny.lm", "parameters": {"encode_model": {"string_value": "fm.llava-tiny.encode"}}})
    assert lm.uses == ("fm.llava-tiny.encode",)
    enc = perf.ModelSignature.from_config({"name": "fm.llava-tiny.encode", "input": [{"name": "PIXEL_VALUES", "data_type": "TYPE_FP32", "dims": [3, 32, 32]}]})
    text_only = perf.make_input_data(sig, perf.InputOptions(max_tokens=5))  # encoder unknown: prompts alone
    assert all(set(e) == {"TEXT", "MAX_NEW_TOKENS"} for e in text_only.data)
    lm.composing["fm.llava-tiny.encode"] = enc
    sig.composing["fm.llava-tiny.lm"] = lm
    data = perf.make_input_data(sig, perf.InputOptions(max_tokens=5))
    assert data.shapes["IMAGES"] == [1, 3, 32, 32]
    for e in data.data:
        pixels = np.frombuffer(base64.b64decode(e["IMAGES"]["b64"]), dtype="<f4")
        assert pixels.size == 3 * 32 * 32 and np.isfinite(pixels).all() and e["MAX_NEW_TOKENS"]["content"] == [5]
        assert e["TEXT"]["content"][0].count("<image>") <= 1


def test_family_named_by_the_config_wins() -> None:
    cfg = json.loads(json.dumps(GEN_VFM))
    cfg["config"]["parameters"][perf.FAMILY_PARAMETER] = {"string_value": "text"}
    assert perf.family_of(perf.ModelSignature.from_config(cfg)).name == "text"


def test_unknown_inputs_are_refused_with_the_way_out() -> None:
    sig = perf.ModelSignature.from_config({"name": "speech", "input": [{"name": "AUDIO", "data_type": "TYPE_FP32", "dims": [1, 16000]}]})
    with pytest.raises(perf.PerfError, match=r"no perf input generator for model 'speech' \(inputs: AUDIO TYPE_FP32 \[1, 16000\]\).*--input-data"):
        perf.family_of(sig)


def test_a_new_family_is_one_function() -> None:
    def is_audio(sig: perf.ModelSignature) -> bool:
        return sig.has("AUDIO", "TYPE_FP32")

    @perf.input_family("audio-test", is_audio)
    def audio(sig: perf.ModelSignature, options: perf.InputOptions) -> perf.InputData:
        return perf.InputData([{"AUDIO": {"content": [0.5] * 32, "shape": [1, 32]}}], {"AUDIO": [1, 32]})

    try:
        sig = perf.ModelSignature.from_config({"name": "speech", "input": [{"name": "AUDIO", "data_type": "TYPE_FP32", "dims": [-1, -1]}]})
        data = perf.make_input_data(sig, perf.InputOptions())
        assert data.shape_args() == ["--shape", "AUDIO:1,32"]
    finally:
        del perf.INPUT_FAMILIES["audio-test"]


def test_image_and_series_requests_take_the_asked_rows() -> None:
    import base64

    import numpy as np

    image = perf.ModelSignature.from_config({"name": "digits", "input": [
        {"name": "IMAGE", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
        {"name": "PIXELS", "data_type": "TYPE_FP32", "dims": [-1, 3, 224, 224], "optional": True}]})
    data = perf.make_input_data(image, perf.InputOptions(rows=2))
    assert perf.family_of(image).name == "images" and data.shape_args() == ["--shape", "PIXELS:2,3,224,224"]
    for e in data.data:
        assert set(e) == {"PIXELS"}
        px = np.frombuffer(base64.b64decode(e["PIXELS"]["b64"]), dtype="<f4")
        assert px.size == 2 * 3 * 224 * 224 and np.isfinite(px).all()
    series = perf.ModelSignature.from_config({"name": "demand", "input": [
        {"name": "SERIES", "data_type": "TYPE_FP32", "dims": [-1, -1]},
        {"name": "HORIZON", "data_type": "TYPE_INT64", "dims": [1], "optional": True}]})
    data = perf.make_input_data(series, perf.InputOptions(rows=3))
    assert perf.family_of(series).name == "series" and data.shape_args() == ["--shape", f"SERIES:3,{perf.SERIES_STEPS}"]
    for e in data.data:
        s = np.frombuffer(base64.b64decode(e["SERIES"]["b64"]), dtype="<f4").reshape(3, perf.SERIES_STEPS)
        assert np.isfinite(s).all() and len({round(float(r.std()), 3) for r in s}) == 3  # three different rows


def test_text_requests_have_several_lengths_and_the_asked_rows() -> None:
    sig = perf.ModelSignature.from_config(TEXT_VFM)
    data = perf.make_input_data(sig, perf.InputOptions(rows=3))
    assert data.shape_args() == ["--shape", "TEXT:3"]
    assert all(e["TEXT"]["shape"] == [3] and len(e["TEXT"]["content"]) == 3 for e in data.data)
    words = {len(s.split()) for e in data.data for s in e["TEXT"]["content"]}
    assert min(words) <= 5 and max(words) >= 40  # short and long sentences
    assert all(s.isprintable() for e in data.data for s in e["TEXT"]["content"])


def test_generative_requests_carry_max_tokens() -> None:
    sig = perf.ModelSignature.from_config(GEN_VFM)
    data = perf.make_input_data(sig, perf.InputOptions(max_tokens=7))
    assert data.shape_args() == ["--shape", "TEXT:1"]
    assert {json.dumps(e["MAX_TOKENS"]) for e in data.data} == {json.dumps({"content": [7], "shape": [1]})}
    assert len({e["TEXT"]["content"][0] for e in data.data}) == len(data.data) > 1
    assert "SEED" not in data.data[0]  # optional inputs the family does not fill stay out


def test_options_become_perf_analyzer_arguments() -> None:
    opts = perf.PerfOptions("localhost:8001", "grpc", concurrency_range="1:8:2", measurement_interval_ms=500, percentile=99, extra=("--max-threads", "4"))
    assert opts.args() == ["-u", "localhost:8001", "-i", "grpc", "--concurrency-range", "1:8:2", "--measurement-interval", "500",
                           "--percentile", "99", "--max-threads", "4"]


def test_library_path_is_set_for_perf_analyzer() -> None:
    cmd, env = perf.perf_analyzer_command()
    lib = perf.cuda_runtime_lib()
    assert Path(cmd[0]).name == "perf_analyzer" and Path(cmd[0]).exists()
    assert lib is not None and (lib / "libcudart.so.12").exists()
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(lib)
    assert perf.shell_line([*cmd, "-m", "x y"]).startswith(f"LD_LIBRARY_PATH={lib} ") and "'x y'" in perf.shell_line(["-m", "x y"])


CSV = """Concurrency,Inferences/Second,Client Send,p50 latency,p99 latency
1,20.5,5,40000,52000
4,61.25,6,60000,90000

Server metrics block,that --verbose-csv may add
x,y
"""
OUTPUT = """Request concurrency: 1
  Client: 
    Request count: 41
Request concurrency: 4
  Client: 
    Request count: 122
"""


def _result(tmp_path: Path, model: str, csv_text: str, output: str = OUTPUT, rc: int = 0, requests: list | None = None) -> perf.PerfResult:
    (tmp_path / f"{model}.csv").write_text(csv_text)
    return perf.PerfResult(model, "text", [], rc, output, perf._read_csv(tmp_path / f"{model}.csv"), requests or [], bool(requests))


def test_csv_report_parsed_and_summed(tmp_path: Path) -> None:
    a = _result(tmp_path, "a", CSV)
    b = _result(tmp_path, "b", CSV.replace("20.5", "10.0").replace("61.25", "30.0"))
    assert a.throughputs == [20.5, 61.25] and a.request_counts == [41, 122]
    lines = perf.summary([a, b])
    assert any("sum of 2" in ln and "concurrency 1" in ln and "30.50 infer/s" in ln for ln in lines)
    assert any("sum of 2" in ln and "concurrency 4" in ln and "91.25 infer/s" in ln for ln in lines)
    assert any(ln.split()[0] == "a" and "122 requests" in ln and "p99      90.0 ms" in ln for ln in lines)


def test_time_to_first_response_from_the_profile_export(tmp_path: Path) -> None:
    reqs = [{"timestamp": 1_000_000_000, "response_timestamps": [1_050_000_000, 1_400_000_000]},
            {"timestamp": 2_000_000_000, "response_timestamps": [2_150_000_000]}]
    r = _result(tmp_path, "chat.stream", CSV, requests=reqs)
    assert r.first_response_ms() == [50.0, 150.0]
    assert any("time to first response: avg 100.0 ms" in ln for ln in perf.summary([r]))


def test_error_is_perf_analyzers_own_line(tmp_path: Path) -> None:
    out = " Successfully read data\nError: The start of the search range must be > 0\nUsage: perf_analyzer [options]\n  error-ish help text\n"
    r = _result(tmp_path, "a", "", output=out, rc=99)
    assert not r.ok and r.error() == "Error: The start of the search range must be > 0"
    loader = _result(tmp_path, "b", "", output="perf_analyzer: error while loading shared libraries: libb64.so.0d: cannot open", rc=127)
    assert "libb64-0d" in loader.error()


def test_cli_help_and_bad_combinations() -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["perf", "--help"])
    assert res.exit_code == 0 and "--streaming" in res.output and "--write-input-data" in res.output and "localhost:8001" in res.output
    res = runner.invoke(main, ["perf", "a", "--concurrency-range", "2", "--request-rate-range", "5"])
    assert res.exit_code == 2 and "exclude each other" in res.output
    res = runner.invoke(main, ["perf", "a", "--streaming", "--protocol", "http"])
    assert res.exit_code == 2 and "grpc" in res.output


def test_cli_without_a_server_says_so() -> None:
    res = CliRunner().invoke(main, ["perf", "sentiment", "--url", "127.0.0.1:1"])
    assert res.exit_code == 1 and "no tritonserver answers grpc at 127.0.0.1:1" in res.output


def test_unstable_measurement_gets_a_way_out(tmp_path: Path) -> None:
    out = "Request concurrency: 2\nFailed to obtain stable measurement within 10 measurement windows for concurrency 2.\nFailed to obtain stable measurement.\n"
    err = _result(tmp_path, "a", "", output=out, rc=99).error()
    assert err.startswith("Failed to obtain stable measurement within 10") and "--request-count" in err


def test_a_given_input_file_is_sized_from_its_first_request(tmp_path: Path) -> None:
    sig = perf.ModelSignature.from_config(GEN_VFM)
    given = tmp_path / "mine.json"
    given.write_text(json.dumps({"data": [{"TEXT": {"content": ["a", "b"], "shape": [2]}, "MAX_TOKENS": {"content": [3], "shape": [1]}}]}))
    assert perf.given_shape_args(sig, given) == ["--shape", "TEXT:2"]  # MAX_TOKENS has a fixed size
    given.write_text("{not json")
    with pytest.raises(perf.PerfError, match="not a perf_analyzer input file"):
        perf.given_shape_args(sig, given)
    with pytest.raises(perf.PerfError, match="No such file"):
        perf.given_shape_args(sig, tmp_path / "missing.json")
