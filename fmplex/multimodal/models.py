"""The tiny multimodal backbones: built from configs, split into stage weights.

Two families, each tiny enough to build and load in well under a second on one
CPU thread (hidden 64, two or three decoder layers, 32x32 images):

* ``llava-tiny`` -- decoder-only LLaVA style: a CLIP-like vision tower and a
  two-layer projector whose outputs replace the ``<image>`` placeholder tokens
  (16 per image) in a Llama-style LM (``LlavaForConditionalGeneration``).
* ``mllama-tiny`` -- cross-attention Mllama style: a tiled vision encoder
  (one tile per image here) and a projector whose outputs the LM's
  cross-attention layer attends to; one ``<image>`` token per image marks
  where in the text the image applies (``MllamaForConditionalGeneration``).

Weights: nothing is downloaded. A model is built from its config with a fixed
seed (``build_model``) and written **once** by the control plane into the
version directories of its two stage hosts, each getting only its own part::

    fm.llava-tiny.encode/1/{config.json, model.safetensors, stage.json}   vision + projector
    fm.llava-tiny.lm/1/{config.json, model.safetensors, stage.json}       LM + lm_head

Why written, not regenerated in each stage process: random initialisation is
deterministic for one torch/transformers build but not promised across
versions or devices, and a stage host that silently built different weights
would still "work". Written files make every process load identical bytes,
each stage loads only what it runs (the encoder never holds the LM), and a
Triton model keeps its data in its own version directory (written at init,
never changed after, so nothing triggers a reload). ``stage.json`` records the
fingerprint of the *whole* model, so the LM host refuses an encoder built from
another model (``check_pair``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from fmplex.backbones import MULTIMODAL, MultimodalSpec, get_multimodal  # noqa: F401 - the one catalog; stage code reads it here

STAGES = ("encode", "lm")
STAGE_FILE = "stage.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STAGE_FORMAT = "fmplex-mm-stage/1"

# Byte-level tokenizer shared by both families: ids 0..255 are UTF-8 bytes.
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = 256, 257, 258, 259
IMAGE_MARKER = "<image>"


class ModelError(ValueError):
    """A stage's weights are missing, malformed, or belong to another model."""


# --- configs and models -----------------------------------------------------------


def build_config(name: str) -> Any:
    """The model config of a catalogued backbone (no files involved)."""
    spec = get_multimodal(name)
    if spec.family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig  # noqa: PLC0415

        vision = CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=64, initializer_factor=1.0,
        )  # fmt: skip
        text = LlamaConfig(
            vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
            pad_token_id=PAD_ID, initializer_range=0.1, tie_word_embeddings=False,
        )  # fmt: skip
        return LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=IMAGE_ID, image_seq_length=16,
            vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        )  # fmt: skip
    from transformers import MllamaConfig, MllamaTextConfig, MllamaVisionConfig  # noqa: PLC0415

    vision = MllamaVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4, intermediate_size=128,
        vision_output_dim=64 * 3, image_size=32, patch_size=8, max_num_tiles=1, supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=[0, 1], initializer_range=0.1,
    )  # fmt: skip
    text = MllamaTextConfig(
        vocab_size=259, hidden_size=64, num_hidden_layers=3, cross_attention_layers=[1], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        max_position_embeddings=512, initializer_range=0.1,
    )  # fmt: skip
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID)


def build_model(name: str, seed: int | None = None) -> Any:
    """The one-piece model with seeded random weights, fp32, eval mode.

    Mllama initialises its tanh gates (cross-attention, gated tile/position
    embeddings) to zero, which would make images invisible to the LM; they are
    set to seeded non-zero values so that the cross-attention path is exercised.
    """
    import torch  # noqa: PLC0415
    from transformers import LlavaForConditionalGeneration, MllamaForConditionalGeneration  # noqa: PLC0415

    spec = get_multimodal(name)
    config = build_config(name)
    cls = LlavaForConditionalGeneration if spec.family == "llava" else MllamaForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed if seed is None else seed)
        model = cls(config)
        if spec.family == "mllama":
            with torch.no_grad():
                for pname, param in model.named_parameters():
                    if pname.endswith("gate") and param.numel() == 1:
                        param.copy_(0.5 + 0.5 * torch.rand(1))
    return model.float().eval()


def model_class(family: str) -> Any:
    from transformers import LlavaForConditionalGeneration, MllamaForConditionalGeneration  # noqa: PLC0415

    return LlavaForConditionalGeneration if family == "llava" else MllamaForConditionalGeneration


# --- splitting into stages ------------------------------------------------------------

# Which state-dict keys of the one-piece model each stage holds.
_ENCODE_PREFIXES = {
    "llava": ("model.vision_tower.", "model.multi_modal_projector."),
    "mllama": ("model.vision_model.", "model.multi_modal_projector."),
}
_LM_PREFIXES = ("model.language_model.", "lm_head.")


def stage_of_key(family: str, key: str) -> str:
    if key.startswith(_ENCODE_PREFIXES[family]):
        return "encode"
    if key.startswith(_LM_PREFIXES):
        return "lm"
    raise ModelError(f"parameter '{key}' belongs to no stage of a {family} model")


def split_state(family: str, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    parts: dict[str, dict[str, Any]] = {s: {} for s in STAGES}
    for key, tensor in state.items():
        parts[stage_of_key(family, key)][key] = tensor
    return parts


def fingerprint(state: dict[str, Any]) -> str:
    """Content hash of named tensors (names, dtypes, shapes, bytes), order-free."""
    import torch  # noqa: PLC0415

    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def write_stages(name: str, dirs: dict[str, Path], seed: int | None = None) -> str:
    """Build the model and write each stage's weights + config + stage.json.

    Returns the whole model's fingerprint (recorded in both stage.json files).
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    spec = get_multimodal(name)
    model = build_model(name, seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    whole = fingerprint(state)
    for stage, part in split_state(spec.family, state).items():
        out = Path(dirs[stage])
        out.mkdir(parents=True, exist_ok=True)
        save_file(part, str(out / WEIGHTS_FILE), metadata={"fmplex_backbone": name, "fmplex_stage": stage})
        (out / CONFIG_FILE).write_text(model.config.to_json_string(use_diff=False), encoding="utf-8")
        meta = {
            "format": STAGE_FORMAT,
            "backbone": name,
            "family": spec.family,
            "stage": stage,
            "seed": spec.seed if seed is None else seed,
            "model_fingerprint": whole,
            "stage_fingerprint": fingerprint(part),
            "parameters": int(sum(t.numel() for t in part.values())),
        }
        (out / STAGE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return whole


@dataclasses.dataclass
class StageFiles:
    """One stage's files as loaded: its meta, model config and tensors."""

    meta: dict[str, Any]
    config: Any
    state: dict[str, Any]


def read_stage(path: Path, stage: str, verify: bool = True) -> StageFiles:
    """Load and check one stage directory (safetensors and JSON only)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(path)
    try:
        meta = json.loads((path / STAGE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"no {STAGE_FILE} in {path} (write the stages with 'fmplex init --backbone NAME')") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path / STAGE_FILE} is not valid JSON: {exc}") from None
    if meta.get("format") != STAGE_FORMAT or meta.get("stage") != stage:
        raise ModelError(f"{path} does not hold the '{stage}' stage of a multimodal model")
    spec = get_multimodal(str(meta.get("backbone")))
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise ModelError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
    if verify and fingerprint(state) != meta.get("stage_fingerprint"):
        raise ModelError(f"{path / WEIGHTS_FILE} does not match its {STAGE_FILE} fingerprint (corrupted or replaced)")
    config = type(build_config(spec.name)).from_json_file(str(path / CONFIG_FILE))
    return StageFiles(meta, config, state)


def check_pair(encode_meta: dict[str, Any], lm_meta: dict[str, Any]) -> None:
    """Refuse an encoder and an LM that were not split from the same model."""
    if encode_meta.get("model_fingerprint") != lm_meta.get("model_fingerprint"):
        raise ModelError(
            f"encode stage ({encode_meta.get('backbone')}, {encode_meta.get('model_fingerprint')}) and lm stage "
            f"({lm_meta.get('backbone')}, {lm_meta.get('model_fingerprint')}) come from different models"
        )


def load_one_piece(encode_dir: Path, lm_dir: Path) -> Any:
    """The one-piece transformers model reassembled from both stages' files
    (the reference that staged serving must equal)."""
    import torch  # noqa: PLC0415

    enc, lm = read_stage(encode_dir, "encode"), read_stage(lm_dir, "lm")
    check_pair(enc.meta, lm.meta)
    with torch.random.fork_rng(devices=[]):  # built on the CPU: rotary buffers are not in the state dict
        model = model_class(lm.meta["family"])(lm.config)
    model.load_state_dict({**enc.state, **lm.state}, strict=True)
    return model.float().eval()


# --- tokenizer ---------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255) plus BOS/EOS/PAD and the image token.

    Tiny random models need no learned vocabulary, and a byte tokenizer ships
    with the code (nothing to download) and round-trips any text. ``<image>``
    in the text marks where an image goes: LLaVA expands it to
    ``image_tokens`` placeholder ids (replaced by the image's features),
    Mllama keeps one id (its cross-attention mask starts there).
    """

    def __init__(self, image_tokens: int) -> None:
        self.image_tokens = image_tokens

    def encode(self, text: str, images: int) -> list[int]:
        """[BOS] + text with its image markers; with none in the text, one
        marker per image is put before it (as chat templates do)."""
        parts = text.split(IMAGE_MARKER)
        markers = len(parts) - 1
        if markers == 0 and images:
            parts = [""] * images + parts
            markers = images
        if markers != images:
            raise ValueError(f"the text has {markers} {IMAGE_MARKER} markers but {images} images were sent")
        ids = [BOS_ID]
        for i, part in enumerate(parts):
            if i:
                ids.extend([IMAGE_ID] * self.image_tokens)
            ids.extend(part.encode("utf-8"))
        return ids

    @staticmethod
    def decode(ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
