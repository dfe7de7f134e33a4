"""Generative (decoder LM) backbones: SmolLM2 with a continuous-batching engine.

``smollm.py`` loads the backbone (GGUF via transformers), ``engine.py`` runs
requests of many tasks in shared, continuously refilled decode batches (its
parts: ``sequence``, ``forward`` + ``kv_cache``, ``sampler``, ``detokenizer``;
the multimodal LM stage runs the same engine with its own forward),
``lora.py`` checks PEFT LoRA and IA3 adapters (read by ``fmplex.peft_reader``),
applied per row inside those batches (``fmplex.row_deltas``); ``serving.py``
holds what the host and the control plane share (the artifact check).
The engine imports nothing from Triton; ``generate_host.py`` is the Triton
model that drives it. Host configs and vFMs are written by the control
plane's generative family (``fmplex.families.generative``).
"""
