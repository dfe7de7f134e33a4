"""The host runtime every fmplex Triton host shares (serving side; imports no control-plane code).

- ``host``: the Triton model base class (request path, worker loop, drain);
- ``settings``: typed host settings read from the model config;
- ``routing``: slot outputs -> task, through the registry view;
- ``ledger``: exactly one final response per request, sent by its own thread;
- ``metrics``: the one metrics class (``fmplex_task_*`` names on every host);
- ``scheduler``: weighted fair queueing and batch formation (pure);
- ``extension_cache``: resident task extensions within a byte budget;
- ``validation``: request decoding errors and the TEXT / token-id decoders.

Only ``host`` and ``metrics`` import Triton's ``triton_python_backend_utils``;
everything else is pure Python and unit-tested alone.
"""
