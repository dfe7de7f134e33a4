"""Generative (decoder LM) backbones: SmolLM2 with a continuous-batching engine.

``smollm.py`` loads the backbone (GGUF via transformers), ``engine.py`` runs
requests of many tasks in shared, continuously refilled decode batches,
``lora.py`` reads PEFT LoRA adapters applied per row inside those batches.
The engine imports nothing from Triton; ``generate_host.py`` is the Triton
model that drives it.
"""
