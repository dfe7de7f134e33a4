"""Generative backbones in the control plane, without a server: configs, CLI, artifacts.

The CLI runs as a user would (console script): ``init --backbone smollm2``
writes both LM hosts, ``task create`` builds generate and PEFT-LoRA tasks and
refuses what cannot run in one line, ``deploy --offline`` writes the two
ensembles of a task, ``undeploy --offline`` removes them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from safetensors.torch import save_file

from fmplex import registry
from fmplex.families import generative as control

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
FMPLEX = str(Path(sys.executable).parent / "fmplex")


def parse(text: str):  # noqa: ANN201
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([FMPLEX, *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def one_line_error(out: subprocess.CompletedProcess[str], words: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert len([ln for ln in out.stderr.splitlines() if ln.startswith("Error:")]) == 1, out.stderr
    assert words.lower() in out.stderr.lower(), out.stderr


def _lora_dir(path: Path, r: int = 2, extra: dict | None = None, proj: str = "self_attn.q_proj", shape: tuple[int, int] = (576, 576)) -> Path:
    """A PEFT-format LoRA directory for SmolLM2 (written by hand: no model needed)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": [proj.split(".")[-1]], **(extra or {})}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    key = f"base_model.model.model.layers.3.{proj}"
    save_file({f"{key}.lora_A.weight": torch.randn(r, shape[0]) * 0.01, f"{key}.lora_B.weight": torch.randn(shape[1], r) * 0.01},
              str(path / "adapter_model.safetensors"))
    return path


def test_host_configs_parse_and_differ_only_in_streaming() -> None:
    whole = parse(control.host_config("smollm2", 4, decoupled=False))
    stream = parse(control.host_config("smollm2", 4, decoupled=True))
    assert (whole.name, stream.name) == ("fm.smollm2", "fm.smollm2.stream")
    assert whole.backend == stream.backend == "fmplex_gen"
    assert not whole.model_transaction_policy.decoupled and stream.model_transaction_policy.decoupled
    assert [o.name for o in whole.output] == [f"TXT_{k}" for k in range(4)]
    assert [(i.name, i.optional) for i in whole.input] == [(n, opt) for n, _, _, opt in control.GEN_INPUTS]
    params = {k: v.string_value for k, v in whole.parameters.items()}
    assert params["max_rows"] == "8" and params["default_max_tokens"] == "16" and params["max_tokens_limit"] == "512"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gencli") / "repo"
    out = run("init", str(path), "--backbone", "smollm2", "--slots", "4")
    assert "host fm.smollm2: backbone smollm2, 4 slots" in out.stdout and "fm.smollm2.stream" in out.stdout
    return path


def test_init_writes_both_hosts_once(repo: Path) -> None:
    before = {p: p.read_bytes() for p in repo.glob("fm.*/config.pbtxt")}
    assert {p.parent.name for p in before} == {"fm.smollm2", "fm.smollm2.stream"}
    reg = registry.load(repo)
    assert reg.hosts["smollm2"].model == "fm.smollm2" and reg.hosts["smollm2"].slots == 4
    run("init", str(repo), "--backbone", "smollm2", "--backbone", "minilm")  # again, plus an encoder
    assert {p: p.read_bytes() for p in repo.glob("fm.smollm2*/config.pbtxt")} == before  # never rewritten
    assert set(registry.load(repo).hosts) == {"smollm2", "minilm"}


def test_tasks_deploy_offline_and_undeploy(repo: Path, tmp_path: Path) -> None:
    run("task", "create", "chat", "--backbone", "smollm2", "--kind", "generate", "--repo", str(repo))
    out = run("task", "create", "tuned", "--backbone", "smollm2", "--kind", "lora", "--source", str(_lora_dir(tmp_path / "ad")), "--repo", str(repo))
    assert "LoRA: 1 modules, rank 2" in out.stdout
    assert sorted(p.name for p in (repo / "tuned" / "1").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    manifest = json.loads((repo / "tuned" / "1" / "manifest.json").read_text())
    assert manifest["kind"] == "lora" and manifest["backbone"] == "smollm2" and manifest["backbone_fingerprint"].startswith("sha256:")
    run("deploy", "chat", "tuned", "--offline", "--repo", str(repo))
    reg = registry.load(repo)
    for name in ("chat", "tuned"):
        entry = reg.tasks[name]
        assert entry.family == control.FAMILY and entry.deployed
        whole = parse((repo / name / "config.pbtxt").read_text())
        stream = parse((repo / f"{name}.stream" / "config.pbtxt").read_text())
        assert (whole.name, stream.name) == (name, f"{name}.stream")
        assert whole.platform == stream.platform == "ensemble"
        assert [s.model_name for s in whole.ensemble_scheduling.step] == ["fm.smollm2"]
        assert [s.model_name for s in stream.ensemble_scheduling.step] == ["fm.smollm2.stream"]
        assert dict(whole.ensemble_scheduling.step[0].output_map) == {f"TXT_{entry.slot}": control.OUTPUT}
        assert [o.name for o in whole.output] == [control.OUTPUT] and "TEXT" in [i.name for i in whole.input]
        assert list(stream.version_policy.specific.versions) == [1] and (repo / f"{name}.stream" / "1").is_dir()
    assert reg.tasks["chat"].slot != reg.tasks["tuned"].slot
    shown = run("task", "show", "tuned", "--repo", str(repo)).stdout
    assert "LoRA r=2" in shown and "tuned.stream (streamed)" in shown
    run("undeploy", "tuned", "--offline", "--repo", str(repo))
    assert not (repo / "tuned" / "config.pbtxt").exists() and not (repo / "tuned.stream").exists()
    assert (repo / "tuned" / "1" / "manifest.json").exists() and not registry.load(repo).tasks["tuned"].deployed


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--kind", "lora"], "needs --source"),
        (["--kind", "generate", "--source", "."], "takes no --source"),
        (["--kind", "classifier"], "does not run on generative backbone"),
        (["--kind", "generate", "--train", "x.csv"], "generative tasks generate text"),
    ],
)
def test_create_refusals_are_one_line(repo: Path, args: list[str], words: str) -> None:
    one_line_error(run("task", "create", "bad", "--backbone", "smollm2", *args, "--repo", str(repo), ok=False), words)
    assert not (repo / "bad").exists() and "bad" not in registry.load(repo).tasks


def test_bad_adapters_are_refused_before_anything_is_written(repo: Path, tmp_path: Path) -> None:
    cases = {
        "wide": (_lora_dir(tmp_path / "wide", shape=(512, 576)), "the backbone's q_proj is 576->576"),
        "dora": (_lora_dir(tmp_path / "dora", extra={"use_dora": True}), "DoRA"),
        "head": (_lora_dir(tmp_path / "head", proj="self_attn.qkv"), "is not supported"),
    }
    (tmp_path / "empty").mkdir()
    cases["empty"] = (tmp_path / "empty", "adapter_config.json is missing")
    for name, (src, words) in cases.items():
        one_line_error(run("task", "create", name, "--backbone", "smollm2", "--kind", "lora", "--source", str(src), "--repo", str(repo), ok=False), words)
        assert not (repo / name).exists() and name not in registry.load(repo).tasks
