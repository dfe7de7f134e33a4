"""The deployments fmplex is compared against (used by perf/ and its tests, never by serving).

``single_task``: one task on its own copy of the MiniLM backbone (Triton's
dynamic batcher, optional CPU/GPU partition). ``monolithic``: one multimodal
task with its whole model in one process (``monolithic_config`` writes its
model directory).
"""
