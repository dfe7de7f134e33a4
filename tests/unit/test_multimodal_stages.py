"""Staged multimodal models equal the one-piece transformers model.

For both families (LLaVA-style placeholder merging, Mllama-style cross
attention) and for text-only, one-image and three-image prompts:
encode stage -> LM prefill gives the one-piece ``model(...)`` logits (fp32,
atol 1e-5; measured max error 0.0), greedy decode on the KV cache gives
``model.generate``'s tokens, and seeded sampling gives ``generate(do_sample)``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fmplex.multimodal import models
from fmplex.multimodal.models import EOS_ID, IMAGE_ID, PAD_ID, ModelError
from fmplex.multimodal.stages import EncodeStage, LMStage

ATOL = 1e-5
BACKBONES = ("llava-tiny", "mllama-tiny")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class Staged:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.dirs = {"encode": root / "encode", "lm": root / "lm"}
        self.fingerprint = models.write_stages(name, self.dirs)
        self.enc = EncodeStage(models.read_stage(self.dirs["encode"], "encode"))
        self.lm = LMStage(models.read_stage(self.dirs["lm"], "lm"))
        self.ref = models.load_one_piece(self.dirs["encode"], self.dirs["lm"])
        self.family = models.get_multimodal(name).family

    def ref_kwargs(self, ids: list[int], images: torch.Tensor) -> dict[str, Any]:
        """What the one-piece model takes for these images (as its processor would build it)."""
        n = images.shape[0]
        if n == 0:
            return {}
        if self.family == "llava":
            return {"pixel_values": images}
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        dense = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, IMAGE_ID)], [[1] * n], 1, len(ids))
        return {
            "pixel_values": images.reshape(1, n, 1, 3, 32, 32),
            "aspect_ratio_ids": torch.ones(1, n, dtype=torch.long),
            "aspect_ratio_mask": torch.ones(1, n, 1, dtype=torch.long),
            "cross_attention_mask": torch.from_numpy(dense),
        }

    def staged_prefill(self, text: str, images: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        ids = self.lm.tokenizer.encode(text, images.shape[0])
        feats = self.enc.encode(images) if images.shape[0] else None
        logits, _ = self.lm.prefill(ids, feats)
        return ids, logits


@pytest.fixture(scope="module", params=BACKBONES)
def staged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Staged:
    return Staged(request.param, tmp_path_factory.mktemp(request.param))


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


PROMPTS = {
    0: "What is the capital of France?",
    1: "Look: <image> What is in it?",
    3: "<image> first, then <image> and <image>. Compare them.",
}


@pytest.mark.parametrize("n", [0, 1, 3])
def test_prefill_logits_equal_one_piece(staged: Staged, n: int) -> None:
    images = _images(n)
    ids, logits = staged.staged_prefill(PROMPTS[n], images)
    with torch.inference_mode():
        ref = staged.ref(input_ids=torch.tensor([ids]), **staged.ref_kwargs(ids, images)).logits[0]
    assert logits.shape == ref.shape == (len(ids), staged.lm.vocab_size)
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_greedy_tokens_equal_generate(staged: Staged, n: int) -> None:
    images = _images(n, seed=2)
    ids = staged.lm.tokenizer.encode(PROMPTS[n], n)
    ours = staged.lm.generate(ids, staged.enc.encode(images) if n else None, 16, want_logits=True)
    it = torch.tensor([ids])
    with torch.inference_mode():
        ref = staged.ref.generate(
            input_ids=it, attention_mask=torch.ones_like(it), max_new_tokens=16, do_sample=False,
            eos_token_id=EOS_ID, pad_token_id=PAD_ID, **staged.ref_kwargs(ids, images),
        )  # fmt: skip
    assert ours.tokens == ref[0, len(ids) :].tolist()
    assert ours.prompt_tokens == len(ids) and ours.prefill_logits is not None


@pytest.mark.parametrize("n", [0, 3])
def test_seeded_sampling_equals_generate(staged: Staged, n: int) -> None:
    images = _images(n, seed=3)
    ids = staged.lm.tokenizer.encode(PROMPTS[n], n)
    feats = staged.enc.encode(images) if n else None
    ours = staged.lm.generate(ids, feats, 12, temperature=0.8, seed=1234)
    again = staged.lm.generate(ids, feats, 12, temperature=0.8, seed=1234)
    other = staged.lm.generate(ids, feats, 12, temperature=0.8, seed=99)
    it = torch.tensor([ids])
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(1234)
        ref = staged.ref.generate(
            input_ids=it, attention_mask=torch.ones_like(it), max_new_tokens=12, do_sample=True, temperature=0.8,
            top_k=0, top_p=1.0, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **staged.ref_kwargs(ids, images),
        )  # fmt: skip
    assert ours.tokens == ref[0, len(ids) :].tolist() == again.tokens
    assert other.tokens != ours.tokens


def test_encoder_batching_does_not_change_features(staged: Staged) -> None:
    """Any grouping of images into encoder batches gives the same features:
    what lets the encode host batch images of different requests and tasks."""
    images = _images(5, seed=4)
    together = staged.enc.encode(images)
    alone = torch.cat([staged.enc.encode(images[i : i + 1]) for i in range(5)])
    mixed = torch.cat([staged.enc.encode(images[:2]), staged.enc.encode(images[2:])])
    assert together.shape == (5, *staged.lm.feature_shape)
    torch.testing.assert_close(alone, together, atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed, together, atol=ATOL, rtol=0)


def test_images_change_the_answer(staged: Staged) -> None:
    """Guards the exactness tests against a path that ignores images."""
    _, a = staged.staged_prefill(PROMPTS[1], _images(1, seed=5))
    _, b = staged.staged_prefill(PROMPTS[1], _images(1, seed=6))
    assert (a[-1] - b[-1]).abs().max() > 1e-2


def test_stage_weights_are_split_and_deterministic(staged: Staged) -> None:
    model = models.build_model(staged.name)
    state = model.state_dict()
    assert models.fingerprint(state) == staged.fingerprint  # same seed, same weights
    parts = models.split_state(staged.family, state)
    assert set(parts["encode"]).isdisjoint(parts["lm"]) and set(parts["encode"]) | set(parts["lm"]) == set(state)
    assert all(k.startswith("lm_head") or "language_model" in k for k in parts["lm"])
    enc, lm = (models.read_stage(staged.dirs[s], s) for s in ("encode", "lm"))
    assert set(enc.state) == set(parts["encode"]) and set(lm.state) == set(parts["lm"])
    models.check_pair(enc.meta, lm.meta)
    assert models.fingerprint(models.build_model(staged.name, seed=7).state_dict()) != staged.fingerprint


def test_bad_inputs_are_refused(staged: Staged) -> None:
    with pytest.raises(ValueError, match=r"pixel values must be \[n, 3, 32, 32\], got \[1, 3, 16, 16\]"):
        staged.enc.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        staged.lm.tokenizer.encode("<image><image>", 1)
    ids = staged.lm.tokenizer.encode(PROMPTS[1], 1)
    with pytest.raises(ValueError, match="image tokens in the prompt for 2 images"):
        staged.lm.prefill(ids, torch.zeros(2, *staged.lm.feature_shape))
    with pytest.raises(ValueError, match="image features must be"):
        staged.lm.prefill(ids, torch.zeros(1, 3, staged.lm.hidden))
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        staged.lm.generate(ids, torch.zeros(1, *staged.lm.feature_shape), 600)


def test_markers_are_added_when_the_text_has_none() -> None:
    tok = models.ByteTokenizer(image_tokens=2)
    assert tok.encode("hi", 2) == [models.BOS_ID, IMAGE_ID, IMAGE_ID, IMAGE_ID, IMAGE_ID, ord("h"), ord("i")]
    assert tok.encode("a<image>b", 1) == [models.BOS_ID, ord("a"), IMAGE_ID, IMAGE_ID, ord("b")]
    assert tok.decode([ord("o"), ord("k"), EOS_ID]) == "ok"


def test_tampered_or_mismatched_stages_are_refused(tmp_path: Path, staged: Staged) -> None:
    import shutil

    bad = tmp_path / "lm"
    shutil.copytree(staged.dirs["lm"], bad)
    from safetensors.torch import load_file, save_file

    state = load_file(str(bad / models.WEIGHTS_FILE))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(bad / models.WEIGHTS_FILE))
    with pytest.raises(ModelError, match="does not match its stage.json fingerprint"):
        models.read_stage(bad, "lm")
    with pytest.raises(ModelError, match="does not hold the 'encode' stage"):
        models.read_stage(staged.dirs["lm"], "encode")
    other = tmp_path / "other"
    models.write_stages(staged.name, {"encode": other / "encode", "lm": other / "lm"}, seed=11)
    with pytest.raises(ModelError, match="come from different models"):
        models.check_pair(models.read_stage(other / "encode", "encode").meta, models.read_stage(staged.dirs["lm"], "lm").meta)


def _engine_equals_alone(
    staged: Staged, engine: Any, prompts: list[tuple[str, int, int, float]], image_seed: int, seed: int, step_after: tuple[int, ...]
) -> list[Any]:
    """Run each prompt (text, images, max new tokens, temperature) alone (``LMStage.generate``)
    and as one request of task ``task{i % 3}`` on ``engine``, submitted in order with one engine
    step after the submissions ``step_after`` names (later requests join a running batch);
    each must get exactly its tokens alone, and its prefill logits within ATOL. Returns the
    requests' answers alone."""
    from fmplex.generative.engine import SamplingParams
    from fmplex.multimodal.lm_engine import lm_sequence

    runs = []
    for i, (text, n, max_new, temperature) in enumerate(prompts):
        images = _images(n, seed=image_seed + i)
        ids = staged.lm.tokenizer.encode(text, n)
        feats = staged.enc.encode(images) if n else None
        alone = staged.lm.generate(ids, feats, max_new, temperature=temperature, seed=seed, want_logits=True)
        params = SamplingParams(max_tokens=max_new, temperature=temperature, seed=seed)
        runs.append((lm_sequence(staged.lm, f"task{i % 3}", ids, feats, params, want_prompt_logits=True), alone))
    for k, (seq, _) in enumerate(runs):
        engine.submit(seq)
        if k in step_after:
            engine.step()
    engine.run_until_idle()
    for seq, alone in runs:
        assert seq.done and seq.outcome == "ok", seq
        assert seq.generated == alone.tokens, seq
        torch.testing.assert_close(seq.prompt_logits, alone.prefill_logits, atol=ATOL, rtol=0)
    return [alone for _, alone in runs]


def test_engine_shared_batches_equal_each_request_alone(staged: Staged) -> None:
    """Several requests of different tasks (text-only, one and three images, different
    lengths, one sampled) share the engine's steps, joining at different steps: each
    gets exactly the tokens and prefill logits it gets alone (``LMStage.generate``)."""
    from fmplex.multimodal.lm_engine import make_engine

    engine = make_engine(staged.lm, max_rows=4, kv_capacity=16)  # 6 requests, 4 rows: some wait for a free row
    cases = [(0, 12, 0.0), (1, 9, 0.0), (3, 16, 0.0), (1, 5, 0.8), (0, 7, 0.0), (3, 11, 0.0)]
    prompts = [(f"task{i % 3}: " + PROMPTS[n], n, max_new, temperature) for i, (n, max_new, temperature) in enumerate(cases)]
    alone = _engine_equals_alone(staged, engine, prompts, image_seed=10, seed=5, step_after=(1, 3, 5))
    assert engine.stats.multi_row_steps >= 3 and engine.stats.max_rows == 4
    assert engine.stats.tokens_generated == sum(len(a.tokens) for a in alone)


class _StepLog:
    """The engine's forward, recording which rows (by image count) each step ran together."""

    def __init__(self, forward: Any) -> None:
        self._forward = forward
        self.steps: list[list[int]] = []

    def __call__(self, rows: list[Any], n_old: int) -> Any:
        self.steps.append([0 if s.context is None else int(s.context.shape[0]) for s in rows])
        return self._forward(rows, n_old)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._forward, name)


def test_mllama_batched_step_equals_each_request_alone(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Mllama rows run as one batched forward: text-only rows (which skip the cross-attention
    layer), one image, two adjacent images, three images, and a prompt whose first tokens
    see no image, joining at different steps and leaving at different steps (rows refilled),
    with the KV and cross caches outgrown mid-run. Each gets exactly the greedy tokens
    (and prefill logits within 1e-5) it gets alone on the transformers modules."""
    from fmplex.multimodal.lm_engine import make_engine
    from fmplex.multimodal.mllama_forward import MllamaForward

    staged = Staged("mllama-tiny", tmp_path_factory.mktemp("mllama-batched"))
    engine = make_engine(staged.lm, max_rows=4, kv_capacity=8)
    assert isinstance(engine.forward, MllamaForward)
    log = _StepLog(engine.forward)
    engine.forward = log
    texts = {
        0: "Tell me a short story about a fox.",
        1: "A long preface before the picture: <image> so what is it?",
        2: "<image><image> Are these two the same?",
        3: "<image> first, then <image> and <image>. Compare them.",
    }
    cases = [(1, 14, 0.0), (0, 6, 0.0), (3, 10, 0.0), (2, 18, 0.0), (0, 12, 0.0), (1, 4, 0.9), (3, 16, 0.0), (0, 9, 0.0)]
    prompts = [(f"t{i}: " + texts[n], n, max_new, temperature) for i, (n, max_new, temperature) in enumerate(cases)]
    _engine_equals_alone(staged, engine, prompts, image_seed=30, seed=3, step_after=(0, 2, 3, 5))
    mixed = [s for s in log.steps if 0 in s and any(s)]
    assert mixed, "no step ran text-only and image rows together"
    assert any(len(set(s) - {0}) > 1 for s in log.steps), "no step ran rows with different numbers of images"
    assert max(len(s) for s in log.steps) == 4 and engine.forward.cross.capacity > 8 and engine.cache.capacity > 8
