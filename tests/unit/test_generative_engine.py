"""The continuous-batching engine against transformers/peft ``generate`` (in-process, fp32).

Exactness: greedy token ids of every request — base model and two PEFT LoRA
tasks of different ranks, all in shared batches, joining at different steps
and leaving at different lengths — equal ``generate(do_sample=False)`` run on
that request alone. Sampling: equal to ``generate(do_sample=True)`` after
``torch.manual_seed(seed)``, whatever shares the batch.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fmplex.generative.engine import Engine, QueueFull, SamplingParams, Sequence, Update  # noqa: E402
from fmplex.generative.lora import load_peft_lora  # noqa: E402
from fmplex.generative.smollm import load_smollm2, set_threads  # noqa: E402
from fmplex.runtime.scheduler import TaskPolicy  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
LENGTHS = [12, 7, 10]  # max_tokens per prompt: rows leave the batch at different steps


@pytest.fixture(scope="module")
def lm():  # noqa: ANN201
    set_threads(1)
    return load_smollm2()


def _make_adapter(lm, tmp, name: str, config_kwargs: dict, seed: int):  # noqa: ANN001, ANN202
    """A PEFT LoRA on (a copy of) the loaded model with random non-zero B; saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    model = get_peft_model(copy.deepcopy(lm.model), LoraConfig(init_lora_weights=False, **config_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.04)
            elif "lora_A" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.eval()
    path = tmp / name
    model.save_pretrained(str(path))
    return model, path


def _reference(model, lm, prompt: str, max_new: int, **kw) -> list[int]:  # noqa: ANN001
    ids = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new, pad_token_id=lm.eos_token_id, **kw)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def tasks(lm, tmp_path_factory):  # noqa: ANN001, ANN201
    """name -> (adapter or None, reference greedy ids per prompt)."""
    tmp = tmp_path_factory.mktemp("lora")
    specs = {
        "lora_r2": dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], use_rslora=True),
        "lora_r8": dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            rank_pattern={"o_proj": 4},
            alpha_pattern={"down_proj": 4},
        ),
    }
    out = {"base": (None, [_reference(lm.model, lm, p, n, do_sample=False) for p, n in zip(PROMPTS, LENGTHS)])}
    for i, (name, kw) in enumerate(specs.items()):
        model, path = _make_adapter(lm, tmp, name, kw, seed=i)
        refs = [_reference(model, lm, p, n, do_sample=False) for p, n in zip(PROMPTS, LENGTHS)]
        del model
        out[name] = (load_peft_lora(path, lm.config, name), refs)
    return out


def _seq(engine: Engine, task: str, prompt: str, adapter=None, sink=None, **params) -> Sequence:  # noqa: ANN001
    return Sequence(task, engine.tokenize(prompt), SamplingParams(**params), adapter=adapter, sink=sink)


def test_greedy_shared_batches_equal_generate_alone(lm, tasks) -> None:  # noqa: ANN001
    """9 requests of 3 tasks (base, LoRA r2 rsLoRA, LoRA r8 with rank/alpha patterns) join
    at three different steps, share every step, leave at different lengths; the KV cache
    starts at 8 positions so it grows while rows are running."""
    engine = Engine(lm, max_rows=8, kv_capacity=8)
    waves: list[list[tuple[Sequence, list[int]]]] = [[], [], []]
    for t, (name, (adapter, refs)) in enumerate(tasks.items()):
        for i, (prompt, n) in enumerate(zip(PROMPTS, LENGTHS)):
            waves[(t + i) % 3].append((_seq(engine, name, prompt, adapter, max_tokens=n), refs[i]))
    for wave in waves:
        for seq, _ in wave:
            engine.submit(seq)
        engine.step()
        engine.step()
    engine.run_until_idle()
    for seq, ref in (pair for wave in waves for pair in wave):
        assert seq.done and seq.outcome == "ok", seq
        assert seq.generated == ref, f"{seq.task} {seq.prompt_ids[:4]}: {seq.generated} != {ref}"
        assert seq.text == lm.tokenizer.decode(ref, skip_special_tokens=True)
    assert engine.stats.max_rows == 8  # the batch was full (9 requests, 8 rows)
    assert engine.stats.rows == engine.stats.tokens_generated == sum(LENGTHS) * 3  # every row of a step made one token
    assert engine.stats.multi_row_steps >= engine.stats.steps - 2
    assert engine.cache.capacity >= 16  # it grew while rows were running
    # the adapters matter: each changes at least one answer
    base = tasks["base"][1]
    for name in ("lora_r2", "lora_r8"):
        assert tasks[name][1] != base, name


def test_a_step_pads_only_the_prompts_it_admits(lm) -> None:  # noqa: ANN001
    """Rows that decode are attended with one query each, also in a step that admits a long
    prompt (its padded volume is rows + prompt, not rows x prompt); one-token prompts admitted
    alone are one query each too. Every answer stays generate()'s."""
    engine = Engine(lm, max_rows=8, kv_capacity=8)
    running = [_seq(engine, "base", p, max_tokens=n) for p, n in zip(PROMPTS, LENGTHS)]
    for seq in running:
        engine.submit(seq)
    engine.step()
    long = _seq(engine, "base", " ".join(PROMPTS), max_tokens=5)
    engine.submit(long)
    report = engine.step()
    assert report is not None and report.rows == 4 and report.admitted == 1
    assert report.padded_tokens == 3 + len(long.prompt_ids)
    engine.run_until_idle()
    for seq, (prompt, n) in zip(running + [long], [*zip(PROMPTS, LENGTHS), (" ".join(PROMPTS), 5)]):
        assert seq.generated == _reference(lm.model, lm, prompt, n, do_sample=False), prompt
    single = [Sequence("base", [i], SamplingParams(max_tokens=4)) for i in (504, 1730, 3125)]
    for seq in single:
        engine.submit(seq)
    report = engine.step()
    assert report is not None and report.rows == 3 and report.padded_tokens == 3
    engine.run_until_idle()
    for seq in single:
        with torch.no_grad():
            out = lm.model.generate(input_ids=torch.tensor([seq.prompt_ids]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                                    max_new_tokens=4, do_sample=False, pad_token_id=lm.eos_token_id)  # fmt: skip
        assert seq.generated == out[0, 1:].tolist(), seq.prompt_ids


def test_sampling_equals_generate_with_seed_whatever_shares_the_batch(lm) -> None:  # noqa: ANN001
    params = dict(max_tokens=10, temperature=0.8, top_k=40, top_p=0.9)
    prompt = PROMPTS[2]
    torch.manual_seed(1234)
    ref = _reference(lm.model, lm, prompt, 10, do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    engine = Engine(lm, max_rows=4)
    alone = _seq(engine, "s", prompt, seed=1234, **params)
    engine.submit(alone)
    engine.run_until_idle()
    crowd = [_seq(engine, "s", p, seed=7, **params) for p in PROMPTS]
    shared = _seq(engine, "s", prompt, seed=1234, **params)
    other_seed = _seq(engine, "s", prompt, seed=99, **params)
    for seq in (crowd[0], crowd[1], shared, crowd[2], other_seed):
        engine.submit(seq)
    engine.run_until_idle()
    assert alone.generated == ref
    assert shared.generated == ref
    assert other_seed.generated != ref


def test_stop_strings_trim_and_end_generation(lm) -> None:  # noqa: ANN001
    engine = Engine(lm)
    full = _seq(engine, "t", PROMPTS[1], max_tokens=16)
    engine.submit(full)
    engine.run_until_idle()
    text = full.text
    stop = "return"
    assert stop in text, text  # the greedy answer (see the test above) contains it
    chunks: list[Update] = []
    cut = _seq(engine, "t", PROMPTS[1], sink=chunks.append, max_tokens=16, stop=("never-here", stop))
    engine.submit(cut)
    engine.run_until_idle()
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop"
    assert len(cut.generated) < len(full.generated)
    assert "".join(u.text for u in chunks) == cut.text
    assert [u.done for u in chunks].count(True) == 1 and chunks[-1].done
    assert all(stop not in u.text for u in chunks)


def test_streaming_chunks_concatenate_to_the_answer(lm) -> None:  # noqa: ANN001
    engine = Engine(lm)
    updates: list[Update] = []
    seq = _seq(engine, "t", "Emoji time: 😀 means", sink=updates.append, max_tokens=12)
    engine.submit(seq)
    engine.run_until_idle()
    assert len(updates) >= 3
    assert "".join(u.text for u in updates) == seq.text == lm.tokenizer.decode(seq.generated, skip_special_tokens=True)
    assert updates[-1].done and updates[-1].finish_reason == "length" and not any(u.done for u in updates[:-1])
    assert len(seq.generated) == 12


def test_max_tokens_and_eos(lm) -> None:  # noqa: ANN001
    engine = Engine(lm)
    one = _seq(engine, "t", PROMPTS[0], max_tokens=1)
    chat = "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n<|im_start|>assistant\n"  # 7 tokens, then EOS
    eos = _seq(engine, "t", chat, max_tokens=24)
    engine.submit(one)
    engine.submit(eos)
    engine.run_until_idle()
    assert len(one.generated) == 1 and one.finish_reason == "length"
    ref = _reference(lm.model, lm, chat, 24, do_sample=False)
    assert eos.generated == ref
    assert ref[-1] == lm.eos_token_id and eos.finish_reason == "stop"  # it ended itself, EOS kept in the ids
    assert "<|im_end|>" not in eos.text


def test_fair_admission_between_tasks(lm) -> None:  # noqa: ANN001
    """One free row: a task that floods does not keep a light task waiting behind its queue."""
    engine = Engine(lm, max_rows=1)
    order: list[str] = []

    def sink(u: Update) -> None:
        if u.done:
            order.append(u.seq.task)

    flood = [_seq(engine, "flood", PROMPTS[0], sink=sink, max_tokens=2) for _ in range(4)]
    for seq in flood:
        engine.submit(seq)
    engine.step()  # flood[0] runs
    engine.submit(_seq(engine, "light", PROMPTS[0], sink=sink, max_tokens=2))
    engine.run_until_idle()
    assert order.index("light") <= 2, order


def test_cancel_deadline_queue_limit_and_context(lm) -> None:  # noqa: ANN001
    engine = Engine(lm, max_context=64)
    updates: list[Update] = []
    flag = {"cancel": False}
    cancelled = Sequence("t", engine.tokenize(PROMPTS[0]), SamplingParams(max_tokens=16), sink=updates.append, cancelled=lambda: flag["cancel"])
    engine.submit(cancelled)
    engine.step()
    flag["cancel"] = True
    engine.run_until_idle()
    assert cancelled.outcome == "cancelled" and [u.done for u in updates].count(True) == 1
    late = Sequence("t", engine.tokenize(PROMPTS[0]), SamplingParams(max_tokens=4), deadline=0.0)
    engine.submit(late, now=1.0)
    engine.step(now=2.0)
    assert late.outcome == "expired" and "deadline exceeded" in (late.error or "")
    engine.set_policy("limited", TaskPolicy(queue_limit=1))
    engine.submit(_seq(engine, "limited", PROMPTS[0], max_tokens=2))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(_seq(engine, "limited", PROMPTS[0], max_tokens=2))
    with pytest.raises(ValueError, match="context limit of 64"):
        engine.submit(_seq(engine, "t", PROMPTS[0], max_tokens=60))
    engine.run_until_idle()
    assert engine.abort_all("host is shutting down") == 0
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(stop=("",)), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_a_temperature_near_zero_samples_the_argmax_instead_of_failing() -> None:
    """logits / 6.3e-115 overflows to infinity (``generate`` raises on the NaN probabilities it
    makes; found by ``make fuzz``): the engine's sampler and the multimodal stage's both give the
    argmax, the limit of softmax(logits / T) as T -> 0. A small but safe temperature still samples."""
    from fmplex.generative.sampler import choose  # noqa: PLC0415
    from fmplex.multimodal.stages import LMStage  # noqa: PLC0415

    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert choose(Sequence("t", [1], SamplingParams(temperature=6.3e-115, seed=1)), logits) == 1
    assert LMStage.choose(logits, 6.3e-115, torch.Generator().manual_seed(1)) == 1
    picks = {choose(Sequence("t", [1], SamplingParams(temperature=100.0, seed=s)), logits) for s in range(40)}
    assert len(picks) > 1  # sampling is still sampling
