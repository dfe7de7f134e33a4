"""Multimodal backbones served as stages.

A multimodal FM is split into stage hosts that run as separate Triton models:
``encode`` (vision tower + projector, batched across requests and tasks by
Triton's dynamic batcher) and ``lm`` (prefill + decode, the one a vFM talks
to). ``models`` builds the tiny LLaVA-style and Mllama-style models and writes
each stage's weights; ``stages`` is the pure-torch stage code; ``encode_host``
and ``lm_host`` are the Triton models. Their configs and the multimodal vFMs are
written by the control plane's multimodal family (``fmplex.families.multimodal``).
"""
