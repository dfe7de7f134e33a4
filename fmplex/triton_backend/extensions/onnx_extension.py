"""``onnx``: the backbone as it is; the head is an ONNX graph run by ONNX Runtime (see ``onnx_head``)."""

from __future__ import annotations

from .base import Extension


class OnnxExtension(Extension):
    """The backbone as it is; the head is the ONNX graph."""

    kind = "onnx"

    @property
    def nbytes(self) -> int:
        return super().nbytes + int(getattr(self.head, "file_bytes", 0))
