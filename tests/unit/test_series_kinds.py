"""Every series kind against its independent reference, in shared batches that mix tasks, kinds and lengths.

References: ``fracast.FracastModel.forecast_batch`` run alone on each row
(``forecast``); a second FracastModel with the whole fine-tuned state dict
loaded (``fork``); fracast's own normalisation and trunk, captured at the
input of its head, then the probe's weights read from the artifact with
safetensors' numpy loader (``classifier``, ``embedding``).
Tolerance: 1e-4 absolute + 1e-4 relative (fp32); labels equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file

from fmplex.artifacts import ArtifactError, read_manifest
from fmplex.families.timeseries import demo_data as dd
from fmplex.families.timeseries.family import SeriesFamily
from fmplex.families.timeseries.importers import SourceError
from fmplex.families.timeseries.inputs import RequestError
from fmplex.families.timeseries.model import base_state, reference_model

ATOL = RTOL = 1e-4
MEASURED: dict[str, float] = {}


def close(name: str, got: np.ndarray, want: np.ndarray) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(got - want)
    MEASURED[name] = max(MEASURED.get(name, 0.0), float(err.max()))
    bad = err > ATOL + RTOL * np.abs(want)
    assert not bad.any(), f"{name}: max error {err.max():.3g} at {np.argwhere(bad)[0]}"


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    print("\nmeasured max abs errors:", {k: f"{v:.2e}" for k, v in sorted(MEASURED.items())})


@pytest.fixture(scope="module")
def fam() -> SeriesFamily:
    torch.set_num_threads(1)
    return SeriesFamily()


@pytest.fixture(scope="module")
def ref():
    return reference_model("fp32")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A fine-tuned state dict: the trunk frozen, three head tensors moved."""
    state = base_state("fp32")
    g = torch.Generator().manual_seed(1)
    for k in ("head.out_proj.weight", "head.queries", "head.summary_proj.bias"):
        state[k] = state[k] + 0.05 * torch.randn(state[k].shape, generator=g)
    path = tmp_path_factory.mktemp("ft") / "finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


@pytest.fixture(scope="module")
def ref_ft(finetuned):
    model = reference_model("fp32")
    _, state = finetuned
    model.core.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("core.")}, strict=True)
    model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")}, strict=True)
    return model


@pytest.fixture(scope="module")
def tasks(fam, finetuned, tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    rows, labels = dd.labelled_windows(per_label=30, seed=0)
    csv = dd.write_labelled_csv(root / "train.csv", rows, labels)
    echoed: list[str] = []
    out = {}
    specs = {
        "fc_a": ("forecast", None, {"horizon": 24, "max_horizon": 120, "quantiles": [0.1, 0.5, 0.9]}),
        "fc_b": ("forecast", None, {}),
        "ft": ("fork", finetuned[0], {"horizon": 48, "max_horizon": 96}),
        "cls": ("classifier", csv, {}),
        "emb": ("embedding", None, {"missing": "reject"}),
    }
    for name, (kind, source, options) in specs.items():
        vdir = root / name / "1"
        fam.build_task(vdir, name, 1, kind, source, options, echoed.append)
        out[name] = (fam.load_task(vdir), vdir)
    out["_echo"] = echoed
    return out


def ref_forecast(model, row: np.ndarray, horizon: int) -> np.ndarray:
    return model.forecast_batch(row[None, :], horizon=horizon)[0]  # [H, 9]


def ref_embedding(model, rows: list[np.ndarray]) -> np.ndarray:
    """fracast's own preprocessing and trunk; the hidden states captured at its head's input."""
    seen = []
    original = model.head.forward_horizon

    def spy(h, **kw):
        seen.append(h.detach().clone())
        return original(h, **kw)

    model.head.forward_horizon = spy
    try:
        for row in rows:
            model.forecast_batch(row[None, :], horizon=1)
    finally:
        model.head.forward_horizon = original
    h = torch.cat(seen).numpy().astype(np.float64)
    return np.concatenate([h.mean(axis=1), h[:, -1]], axis=1)


def nan_pad(rows: list[np.ndarray]) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def test_mixed_batch_every_kind_matches_its_reference(fam, ref, ref_ft, tasks):
    sun, co2, eln, nile = (dd.series(n) for n in ("sunspots", "co2", "elnino", "nile"))
    t = {k: v[0] for k, v in tasks.items() if not k.startswith("_")}
    co2_tail = co2[800:1500]  # holds missing values (NaN) inside
    assert np.isnan(co2_tail).any()
    requests = [
        # task, SERIES, LENGTHS, HORIZON
        (t["fc_a"], nan_pad([sun[:120], sun[:309], eln[:64]]), None, None),
        (t["fc_b"], np.stack([eln[:300], eln[100:400]]), np.array([300, 250]), None),
        (t["ft"], nan_pad([nile, sun[50:250]]), None, None),
        (t["cls"], nan_pad([sun[10:130], co2[100:300], eln[200:330]]), None, None),
        (t["fc_a"], nan_pad([co2_tail, sun[:33]]), None, np.array([100])),  # three rounds
        (t["emb"], nan_pad([eln[:48], sun[:200]]), None, None),
        (t["ft"], sun[None, :280].copy(), None, np.array([60])),  # two rounds through the forked head
        (t["fc_b"], np.tile(eln, 4)[None, :2500], None, np.array([5])),  # longer than the 2048-step context
    ]
    decoded = [fam.decode(task, s, ln, h) for task, s, ln, h in requests]
    results = fam.run_batch(list(zip([r[0] for r in requests], decoded)))
    rep = fam.executor.last
    assert rep.rows == sum(len(d.rows) for d in decoded) and rep.tasks == 5 and rep.rounds == 3
    w = load_numpy(str(tasks["cls"][1] / "weights.safetensors"))
    labels = read_manifest(tasks["cls"][1])["labels"]
    for (task, _s, _ln, _h), req, res in zip(requests, decoded, results):
        assert res.error is None, res.error
        out = res.outputs
        if task.kind in ("forecast", "fork"):
            model = ref_ft if task.kind == "fork" else ref
            h = req.horizon
            assert out["FORECAST"].shape == (len(req.rows), h)
            assert out["QUANTILES"].shape == (len(req.rows), h, len(task.quantiles))
            for i, row in enumerate(req.rows):
                want = ref_forecast(model, row, h)
                q = [model.quantiles.index(x) for x in task.quantiles]
                close(f"{task.kind} quantiles", out["QUANTILES"][i], want[:, q])
                close(f"{task.kind} point", out["FORECAST"][i], want[:, model.quantiles.index(0.5)])
        elif task.kind == "classifier":
            emb = ref_embedding(ref, req.rows)
            logits = emb @ w["head.weight"].astype(np.float64).T + w["head.bias"]
            close("classifier logits", out["LOGITS"], logits)
            assert [x.decode() for x in out["LABEL"]] == [labels[j] for j in logits.argmax(axis=1)]
        else:
            close("embedding", out["EMBEDDING"], ref_embedding(ref, req.rows))


def test_values_near_the_float32_limit_are_scaled_in_float64_as_fracast_does(fam, ref, tasks):
    """A row whose span overflows float32 (+-3e38): fracast scales it in float64; in float32 the
    scaled values were infinite and the forecast wrong (found by the series fuzz property)."""
    t = tasks["fc_b"][0]
    rows = [np.array([3e38, -3e38] * 20, dtype=np.float32), np.array([1e30, -1e30] * 20, dtype=np.float32)]
    res = fam.run_batch([(t, fam.decode(t, np.stack(rows), None, np.array([4])))])[0]
    assert res.error is None, res.error
    for i, row in enumerate(rows):
        close("near-limit point", res.outputs["FORECAST"][i], ref_forecast(ref, row, 4)[:, ref.quantiles.index(0.5)])


def test_a_fork_differs_from_the_base_and_keeps_only_what_differs(fam, ref, tasks):
    task, vdir = tasks["ft"]
    kept = load_numpy(str(vdir / "weights.safetensors"))
    assert sorted(kept) == ["head.out_proj.weight", "head.queries", "head.summary_proj.bias"]
    assert read_manifest(vdir)["head"]["tensors"] == sorted(kept)
    assert any("kept 3 of" in line for line in tasks["_echo"])
    row = dd.series("sunspots")[:200]
    req = fam.decode(task, row[None, :])
    got = fam.run_batch([(task, req)])[0].outputs["FORECAST"][0]
    base = ref_forecast(ref, row, 48)[:, 4]
    assert np.abs(got - base).max() > 1e-2  # the fine-tune is really applied


def test_classifier_training_prints_held_out_accuracy_and_separates_sources(tasks):
    echo = tasks["_echo"]
    held = [line for line in echo if line.startswith("held-out accuracy (80/20 split):")]
    assert held, echo
    assert float(held[0].split(":")[1]) >= 0.7  # three very different sources


def test_answers_do_not_depend_on_chunking_or_batch_mates(fam, tasks):
    t = tasks["fc_a"][0]
    sun = dd.series("sunspots")
    reqs = [fam.decode(t, sun[None, i * 20 : i * 20 + 100 + i], horizon=np.array([60])) for i in range(7)]
    together = fam.run_batch([(t, r) for r in reqs])
    small = SeriesFamily(max_pass_rows=3)
    small._executor = None
    alone = [small.run_batch([(t, r)])[0] for r in reqs[:2]]
    chunked = small.run_batch([(t, r) for r in reqs])
    for a, b in zip(together, chunked):
        close("chunking", a.outputs["QUANTILES"], b.outputs["QUANTILES"])
    for a, b in zip(together, alone):
        close("batch mates", a.outputs["QUANTILES"], b.outputs["QUANTILES"])


def test_bad_requests_fail_alone_and_good_ones_in_the_same_batch_stay_exact(fam, ref, tasks):
    fc, emb = tasks["fc_a"][0], tasks["emb"][0]
    sun = dd.series("sunspots")
    holed = sun[None, :100].copy()
    holed[0, 40] = np.nan
    sent = [
        (fc, sun[None, :150], None, None),
        (fc, sun[None, :5], None, None),  # too short
        (fc, sun[None, :150], None, np.array([121])),  # over max_horizon
        (emb, holed, None, None),  # NaN inside, task refuses missing values
        (fc, sun[None, :150].astype(np.float64), None, None),  # wrong dtype
        (fc, sun[:150], None, None),  # wrong shape
        (fc, holed, None, np.array([30])),  # NaN inside, task masks it: fine
    ]
    good, errors = [], []
    for i, (task, s, ln, h) in enumerate(sent):
        try:
            good.append((i, task, fam.decode(task, s, ln, h)))
        except RequestError as exc:
            errors.append((i, str(exc)))
    assert [i for i, _ in errors] == [1, 2, 3, 4, 5]
    assert all("\n" not in m for _, m in errors)
    results = fam.run_batch([(task, req) for _, task, req in good])
    for (_, _, req), res in zip(good, results):
        want = ref_forecast(ref, req.rows[0], req.horizon)
        close("beside bad requests", res.outputs["QUANTILES"][0], want[:, [0, 4, 8]])


def test_a_failing_head_fails_only_its_own_task(fam, tasks, monkeypatch):
    ft, fc = tasks["ft"][0], tasks["fc_b"][0]
    sun = dd.series("sunspots")

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(ft.head, "forward_horizon", broken)
    res = fam.run_batch([(ft, fam.decode(ft, sun[None, :100])), (fc, fam.decode(fc, sun[None, :100]))])
    assert res[0].error is not None and "task 'ft' failed: RuntimeError: boom" in res[0].error
    assert res[1].error is None and res[1].outputs["FORECAST"].shape == (1, 48)


# --- importer and artifact refusals ------------------------------------------------------------------------


def test_fork_importer_refusals(fam, finetuned, tmp_path):
    _, state = finetuned

    def build(st, name="x.safetensors"):
        p = tmp_path / name
        save_file({k: v.contiguous() for k, v in st.items()}, str(p))
        return fam.build_task(tmp_path / "t" / "1", "t", 1, "fork", p, {}, lambda s: None)

    trunk = dict(state)
    trunk["core.block.pw.weight"] = trunk["core.block.pw.weight"] + 1e-3
    with pytest.raises(SourceError, match=r"changed the shared trunk \(core.block.pw.weight\)"):
        build(trunk)
    with pytest.raises(SourceError, match="identical to the packaged one"):
        build(base_state("fp32"))
    with pytest.raises(SourceError, match="not Fracast-0 parameters"):
        build({**state, "head.extra": torch.zeros(3)})
    with pytest.raises(SourceError, match="has shape"):
        build({**state, "head.queries": torch.zeros(3, 3)})
    head_only = {k: v for k, v in state.items() if k.startswith("head.")}
    manifest = build(head_only, "head_only.safetensors")
    assert len(manifest["head"]["tensors"]) == 3
    (tmp_path / "w.pt").write_bytes(b"not read")
    with pytest.raises(SourceError, match="must be a .safetensors file"):
        fam.build_task(tmp_path / "u" / "1", "u", 1, "fork", tmp_path / "w.pt", {}, lambda s: None)


def test_artifact_refusals(fam, tmp_path):
    def build(kind, **options):
        return fam.build_task(tmp_path / kind / "1", "t", 1, kind, None, options, lambda s: None)

    with pytest.raises(ArtifactError, match="quantile 0.25 is not one the model predicts"):
        build("forecast", quantiles=[0.25])
    with pytest.raises(ArtifactError, match="'horizon' must be an integer in 1..96"):
        build("forecast", horizon=97, max_horizon=96)
    with pytest.raises(SourceError, match="over the family's limit"):
        build("forecast", max_horizon=10_000)
    with pytest.raises(ArtifactError, match="'missing' must be 'mask' or 'reject'"):
        build("embedding", missing="zero")
    with pytest.raises(SourceError, match="takes no option 'horizon'"):
        build("embedding", horizon=3)
    m = build("forecast", horizon=12)
    assert m["horizon"] == 12 and m["backbone"] == "fm.fracast"
    task = fam.load_task(tmp_path / "forecast" / "1")
    assert (task.horizon, task.max_horizon) == (12, 48)


def test_classifier_artifact_refusals(fam, tasks, tmp_path):
    import json
    import shutil

    src = tasks["cls"][1]
    vdir = tmp_path / "cls" / "1"
    shutil.copytree(src, vdir)
    m = json.loads((vdir / "manifest.json").read_text())
    (vdir / "manifest.json").write_text(json.dumps({**m, "labels": m["labels"][:2]}))
    with pytest.raises(ArtifactError, match="2 labels for a head with 3 outputs"):
        fam.load_task(vdir)
    (vdir / "manifest.json").write_text(json.dumps({**m, "backbone_fingerprint": "sha256:0"}))
    with pytest.raises(ArtifactError, match="trained on backbone weights 'sha256:0'"):
        fam.load_task(vdir)
    (vdir / "manifest.json").write_text(json.dumps({**m, "backbone": "fm.efficientnet"}))
    with pytest.raises(ArtifactError, match="made for backbone 'fm.efficientnet'"):
        fam.load_task(vdir)


def test_w8_weights_match_fracasts_own_w8_model(tmp_path):
    """The int8 weights (fracast's default format) through the family, against FracastModel(weights='w8')."""
    fam8 = SeriesFamily(weights="w8")
    fam8.build_task(tmp_path / "f" / "1", "f", 1, "forecast", None, {"max_horizon": 60}, lambda s: None)
    task = fam8.load_task(tmp_path / "f" / "1")
    ref8 = reference_model("w8")
    eln, sun = dd.series("elnino"), dd.series("sunspots")
    reqs = [fam8.decode(task, eln[None, :400]), fam8.decode(task, sun[None, :90], horizon=np.array([60]))]
    for req, res in zip(reqs, fam8.run_batch([(task, r) for r in reqs])):
        close("w8 forecast", res.outputs["QUANTILES"][0], ref_forecast(ref8, req.rows[0], req.horizon))
    from fmplex.families.timeseries.model import fingerprint

    assert fam8.executor.backbone.fingerprint == fingerprint("w8") != fingerprint("fp32")


def test_family_description_agrees_with_the_tasks():
    from fmplex.families.timeseries.tasks import CLASSES, KINDS, OUTPUT_FAMILIES

    assert tuple(k.name for k in SeriesFamily.kinds) == KINDS == tuple(CLASSES)
    assert tuple(SeriesFamily.outputs) == OUTPUT_FAMILIES
    assert {c.family for c in CLASSES.values()} == set(OUTPUT_FAMILIES)
    names = [s.name for specs in SeriesFamily.outputs.values() for s in specs]
    assert len(names) == len(set(names)) and {s.prefix for specs in SeriesFamily.outputs.values() for s in specs} == {"OUT", "QNT", "TXT"}


def test_a_head_fine_tuned_on_co2_becomes_a_fork_that_matches_the_fine_tuned_model(fam, tmp_path):
    from fmplex.families.timeseries.finetune import finetune_head

    lines: list[str] = []
    state = finetune_head([dd.series("co2")], steps=4, windows=6, echo=lines.append, backbone=fam.executor.backbone)
    first, last = (float(x) for x in lines[0].split("pinball loss ")[1].split(" -> "))
    assert last < first
    src = tmp_path / "co2_head.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(src))
    m = fam.build_task(tmp_path / "co2" / "1", "co2", 1, "fork", src, {}, lines.append)
    assert m["head"]["tensors"] and all(k.startswith("head.") for k in m["head"]["tensors"])
    task = fam.load_task(tmp_path / "co2" / "1")
    model = reference_model("fp32")
    model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")}, strict=True)
    row = dd.series("co2")[1500:1900]
    got = fam.run_batch([(task, fam.decode(task, row[None, :]))])[0].outputs["QUANTILES"][0]
    close("fine-tuned fork", got, ref_forecast(model, row, 48))
