"""What a multimodal vFM and its lm stage host look like from outside (pure data).

Shared by the control plane (which writes the configs) and the lm host (which
reads the inputs and fills the slot outputs).
"""

from __future__ import annotations

# Inputs of the lm host, which are also every multimodal vFM's public inputs:
# name, Triton type, dims, optional.
LM_INPUTS = (
    ("TEXT", "TYPE_STRING", "[ 1 ]", False),  # one prompt; '<image>' marks where each image goes
    ("IMAGES", "TYPE_FP32", "[ -1, -1, -1, -1 ]", True),  # [n, 3, H, W]; omitted or n = 0: text only
    ("MAX_NEW_TOKENS", "TYPE_INT32", "[ 1 ]", True),  # default: the task's
    ("TEMPERATURE", "TYPE_FP32", "[ 1 ]", True),  # 0 = greedy; default: the task's
    ("SEED", "TYPE_INT64", "[ 1 ]", True),  # for sampling
)

# Slot outputs: slot k answers on prefix + k; the vFM maps them to the public names.
SLOT_OUTPUTS = {
    "GEN_TEXT_": "GENERATED_TEXT",
    "GEN_IDS_": "TOKEN_IDS",
    "PROMPT_IDS_": "PROMPT_IDS",
    "LOGITS_": "PREFILL_LOGITS",  # computed only when asked for
    "TIMING_": "TIMING_MS",  # per-request timing measured in the host (see TIMING_FIELDS)
}
SLOT_TYPES = {
    "GEN_TEXT_": ("TYPE_STRING", "[ 1 ]"),  # the generated text (UTF-8, EOS dropped)
    "GEN_IDS_": ("TYPE_INT64", "[ -1 ]"),  # generated token ids (EOS included if it stopped there)
    "PROMPT_IDS_": ("TYPE_INT64", "[ -1 ]"),  # the prompt as tokenized (task prompt + TEXT, image tokens)
    "LOGITS_": ("TYPE_FP32", "[ -1, -1 ]"),  # prefill logits [prompt tokens, vocab]
    "TIMING_": ("TYPE_FP32", "[ 3 ]"),  # TIMING_FIELDS, milliseconds
}

# TIMING_MS, milliseconds from the request's arrival in the host's execute():
# until its prefill started (queueing, and encoding its images), until its first
# token was chosen, until its answer was ready. The answer is one final
# response, so a client gets time to first token as its own end-to-end latency
# minus (total - first token): what the host spent decoding after the first
# token (perf/bench_multimodal_trace.py). The monolithic baseline reports the same.
TIMING_FIELDS = ("queue_ms", "first_token_ms", "total_ms")


def slot_of(name: str) -> int | None:
    """The slot an output name belongs to (None: not a slot output)."""
    for prefix in SLOT_OUTPUTS:
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return int(name[len(prefix) :])
    return None
