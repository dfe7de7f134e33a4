"""The two stages of a multimodal model, in pure torch (no Triton imports).

``EncodeStage.encode(pixel_values [n, 3, H, W]) -> features [n, tokens, hidden]``
runs the vision tower and the projector on images one by one or batched --
images never interact in either family, so any grouping of images into
encoder batches gives the same features (this is what lets the encode host
batch images of different requests and tasks together).

``LMStage`` holds the language model and ``lm_head``. Its prefill takes the
prompt's token ids and the features of the prompt's images (in order):

* LLaVA: the features replace the embeddings of the ``<image>`` placeholder
  tokens (16 per image), exactly as ``LlavaModel`` does with ``masked_scatter``;
* Mllama: the features are the cross-attention states, with the
  cross-attention mask that Mllama's processor derives from the image tokens'
  positions (``get_cross_attention_token_mask``); each decode step reuses the
  mask's last row, as ``MllamaForConditionalGeneration.generate`` does.

``LMStage.generate`` decodes one request alone, one token at a time on the KV
cache (greedy, or sampled with a per-request generator): the monolithic
baseline runs it, and it is the reference the lm stage host's shared engine
steps (``lm_engine``) must equal. Each function mirrors the transformers code path of
the one-piece model; tests/unit/test_multimodal_stages.py checks logits
(1e-5, fp32) and generated tokens against ``model(...)`` and ``model.generate``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fmplex.generative.sampler import draw

from .models import EOS_ID, IMAGE_ID, ByteTokenizer, StageFiles


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    module.load_state_dict(part, strict=True)


def _fresh(build: Any) -> Any:
    """Construct a module without touching the caller's RNG stream (its random
    init is overwritten by the stage's weights right after)."""
    with torch.random.fork_rng(devices=[]):
        return build()


class EncodeStage:
    """Vision tower + projector of one multimodal model."""

    def __init__(self, files: StageFiles, device: str = "cpu") -> None:
        from transformers import AutoModel  # noqa: PLC0415

        self.family = files.meta["family"]
        self.config = config = files.config
        self.device = torch.device(device)
        vc = config.vision_config
        self.image_size = int(vc.image_size)
        self.channels = int(vc.num_channels)
        if self.family == "llava":
            from transformers.models.llava.modeling_llava import LlavaMultiModalProjector  # noqa: PLC0415

            self.vision = _fresh(lambda: AutoModel.from_config(vc))
            self.projector = _fresh(lambda: LlavaMultiModalProjector(config))
            _load(self.vision, files.state, "model.vision_tower.")
            self.tokens = (self.image_size // int(vc.patch_size)) ** 2 + (
                0 if config.vision_feature_select_strategy == "default" else 1
            )
        else:
            from transformers.models.mllama.modeling_mllama import MllamaVisionModel  # noqa: PLC0415

            self.vision = _fresh(lambda: MllamaVisionModel._from_config(vc))
            self.projector = _fresh(lambda: torch.nn.Linear(vc.vision_output_dim, config.text_config.hidden_size, bias=True))
            _load(self.vision, files.state, "model.vision_model.")
            self.tokens = int(vc.max_num_tiles) * self.vision.num_patches
        _load(self.projector, files.state, "model.multi_modal_projector.")
        self.hidden = int(config.text_config.hidden_size)
        for m in (self.vision, self.projector):
            m.float().eval().to(self.device)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, tokens, hidden] (fp32, on this stage's device)."""
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != self.image_shape:
            raise ValueError(f"pixel values must be [n, {', '.join(map(str, self.image_shape))}], got {list(pixel_values.shape)}")
        x = pixel_values.to(self.device, torch.float32)
        n = x.shape[0]
        if self.family == "llava":
            # LlavaModel.get_image_features: hidden states of vision_feature_layer,
            # CLS dropped for the "default" strategy, then the projector.
            out = self.vision(x, output_hidden_states=True, return_dict=True)
            layer = self.config.vision_feature_layer
            if isinstance(layer, int):
                feats = out.hidden_states[layer]
                if self.config.vision_feature_select_strategy == "default":
                    feats = feats[:, 1:]
            else:
                pool = [out.hidden_states[i] for i in layer]
                if self.config.vision_feature_select_strategy == "default":
                    pool = [h[:, 1:] for h in pool]
                feats = torch.cat(pool, dim=-1)
            return self.projector(feats)
        # Mllama: each image is one sample with one tile (aspect ratio id 1 = [1, 1]).
        ones = torch.ones((n, 1), dtype=torch.long, device=self.device)
        out = self.vision(
            pixel_values=x.reshape(n, 1, 1, *self.image_shape),
            aspect_ratio_ids=ones,
            aspect_ratio_mask=ones.reshape(n, 1, 1),
        )
        states = self.projector(out.last_hidden_state)  # [n, 1, tiles, patches, hidden]
        return states.reshape(n, -1, self.hidden)


@dataclasses.dataclass
class Generation:
    tokens: list[int]  # generated ids (EOS included when it stopped there)
    prefill_logits: torch.Tensor | None  # [prompt tokens, vocab] when asked for
    prompt_tokens: int
    prefill_s: float = 0.0
    decode_s: float = 0.0


class LMStage:
    """Language model + lm_head: prefill with image features, decode on a KV cache."""

    def __init__(self, files: StageFiles, device: str = "cpu") -> None:
        from transformers import AutoModel  # noqa: PLC0415

        self.family = files.meta["family"]
        self.config = config = files.config
        self.device = torch.device(device)
        tc = config.text_config
        if self.family == "llava":
            self.lm = _fresh(lambda: AutoModel.from_config(tc))
            self.image_tokens = int(config.image_seq_length)  # placeholder ids per image in the prompt
            vc = config.vision_config
            self.feature_tokens = (int(vc.image_size) // int(vc.patch_size)) ** 2 + (
                0 if config.vision_feature_select_strategy == "default" else 1
            )
        else:
            from transformers.models.mllama.modeling_mllama import MllamaTextModel  # noqa: PLC0415

            self.lm = _fresh(lambda: MllamaTextModel._from_config(tc))
            self.image_tokens = 1
            vc = config.vision_config
            self.patches = (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1
            self.tiles = int(vc.max_num_tiles)
            self.feature_tokens = self.tiles * self.patches
        self.lm_head = _fresh(lambda: torch.nn.Linear(tc.hidden_size, tc.vocab_size, bias=False))
        _load(self.lm, files.state, "model.language_model.")
        _load(self.lm_head, files.state, "lm_head.")
        for m in (self.lm, self.lm_head):
            m.float().eval().to(self.device)
        self.hidden = int(tc.hidden_size)
        self.vocab_size = int(tc.vocab_size)
        self.max_positions = int(tc.max_position_embeddings)
        self.image_token_id = int(config.image_token_index)
        assert self.image_token_id == IMAGE_ID
        self.tokenizer = ByteTokenizer(self.image_tokens)

    @property
    def feature_shape(self) -> tuple[int, int]:
        """What the encode stage returns per image."""
        return (self.feature_tokens, self.hidden)

    # --- prefill / decode ----------------------------------------------------------
    def check_prompt(self, ids: list[int], features: torch.Tensor | None) -> int:
        """Refuse a prompt whose image tokens do not match its features; the number of images."""
        images = 0 if features is None else int(features.shape[0])
        placeholders = sum(1 for i in ids if i == self.image_token_id)
        if placeholders != images * self.image_tokens:
            raise ValueError(f"{placeholders} image tokens in the prompt for {images} images ({self.image_tokens} each)")
        if features is not None and tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(f"image features must be [n, {self.feature_tokens}, {self.hidden}], got {list(features.shape)}")
        return images

    @torch.inference_mode()
    def prompt_embeddings(self, ids: list[int], features: torch.Tensor | None) -> torch.Tensor:
        """LLaVA: the prompt's input embeddings [seq, hidden], each image's features in place of
        its placeholder tokens (``LlavaModel``'s ``masked_scatter``)."""
        assert self.family == "llava", "only LLaVA merges features into the input embeddings"
        images = self.check_prompt(ids, features)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        embeds = self.lm.get_input_embeddings()(input_ids)
        if images:
            mask = (input_ids == self.image_token_id).unsqueeze(-1)
            feats = features.to(self.device, embeds.dtype).reshape(-1, self.hidden)
            embeds = embeds.masked_scatter(mask, feats)
        return embeds

    @torch.inference_mode()
    def prefill(self, ids: list[int], features: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """Logits of every prompt position [seq, vocab] and the decode state."""
        images = self.check_prompt(ids, features)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        if self.family == "llava":
            embeds = self.prompt_embeddings(ids, features)
            out = self.lm(inputs_embeds=embeds, use_cache=True, return_dict=True)
            state: dict[str, Any] = {"cache": out.past_key_values, "row": None}
        else:
            kwargs: dict[str, Any] = {}
            row = None
            if images:
                from transformers.models.mllama.processing_mllama import (  # noqa: PLC0415
                    convert_sparse_cross_attention_mask_to_dense,
                    get_cross_attention_token_mask,
                )

                sparse = get_cross_attention_token_mask(ids, self.image_token_id)
                dense = convert_sparse_cross_attention_mask_to_dense([sparse], [[self.tiles] * images], self.tiles, len(ids))
                mask = torch.from_numpy(dense).to(self.device)  # [1, seq, images, tiles]
                row = mask[:, -1:]  # every decoded token sees what the last prompt token sees
                kwargs["cross_attention_states"] = features.to(self.device, torch.float32).reshape(-1, self.patches, self.hidden)
                kwargs.update(self._cross_mask(mask))
            out = self.lm(input_ids=input_ids, use_cache=True, return_dict=True, **kwargs)
            state = {"cache": out.past_key_values, "row": row}
        logits = self.lm_head(out.last_hidden_state)[0]
        return logits, state

    def _cross_mask(self, mask: torch.Tensor) -> dict[str, Any]:
        from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask  # noqa: PLC0415

        cross, full_row = _prepare_cross_attention_mask(mask, num_vision_tokens=self.patches, dtype=torch.float32)
        return {"cross_attention_mask": cross, "full_text_row_masked_out_mask": full_row}

    @torch.inference_mode()
    def step(self, state: dict[str, Any], token: int) -> torch.Tensor:
        """Feed one token; the next position's logits [vocab]."""
        input_ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {}
        if self.family == "mllama" and state["row"] is not None:
            kwargs.update(self._cross_mask(state["row"]))
        out = self.lm(input_ids=input_ids, past_key_values=state["cache"], use_cache=True, return_dict=True, **kwargs)
        state["cache"] = out.past_key_values
        return self.lm_head(out.last_hidden_state)[0, -1]

    @staticmethod
    def choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
        """Greedy (temperature 0) or a sample from softmax(logits / T), as
        transformers' generate does (temperature only: no top-k/top-p)."""
        if temperature <= 0:
            return int(torch.argmax(logits, dim=-1))
        return draw(torch.softmax(logits.float() / temperature, dim=-1), logits, generator)

    def generate(
        self,
        ids: list[int],
        features: torch.Tensor | None,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int | None = None,
        eos_id: int | None = EOS_ID,
        want_logits: bool = False,
    ) -> Generation:
        import time  # noqa: PLC0415

        if len(ids) + max_new_tokens > self.max_positions:
            raise ValueError(
                f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the model's {self.max_positions} positions"
            )
        generator = None
        if temperature > 0:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(int(seed) if seed is not None else int(torch.seed()))
        t0 = time.perf_counter()
        logits, state = self.prefill(ids, features)
        t1 = time.perf_counter()
        tokens: list[int] = []
        nxt = logits[-1]
        while len(tokens) < max_new_tokens:
            tok = self.choose(nxt.cpu(), temperature, generator)
            tokens.append(tok)
            if eos_id is not None and tok == eos_id or len(tokens) == max_new_tokens:
                break
            nxt = self.step(state, tok)
        t2 = time.perf_counter()
        return Generation(tokens, logits.cpu() if want_logits else None, len(ids), t1 - t0, t2 - t1)
