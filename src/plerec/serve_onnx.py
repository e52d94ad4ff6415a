"""`plerec serve --backend onnx`: the forward pass in ONNX Runtime instead of eager torch.

At start (and at each reload) the model is exported by `plerec export`'s ONNX exporter, its outputs left as
logits (every task exported as a "regression": TaskOutputs then applies no sigmoid), so that the service
fuses them by Eq. 1 in float64 exactly as with torch. ONNX Runtime runs the graph on the same encoded
tensors; its logits agree with torch's within float32 rounding (the tests check 1e-5). On the benchmark's
PLE it took about half the CPU time of the eager forward pass (100 rows, one thread).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from plerec.data.tables import EncodedTable
from plerec.export import TaskOutputs, _export_onnx, example_inputs, input_names
from plerec.rank import Scorer


class OnnxForward:
    """The logits (N, T) of encoded rows by ONNX Runtime, one session per loaded model."""

    def __init__(self, scorer: Scorer, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError("--backend onnx needs onnxruntime: pip install 'plerec[serve]'") from None
        encoder, names = scorer.encoder, scorer.task_names
        self.names = list(input_names(encoder))
        logits = TaskOutputs(scorer.model, names, ["regression"] * len(names))  # no sigmoid: the logits
        with tempfile.TemporaryDirectory(prefix="plerec-serve-") as folder:
            path = str(Path(folder) / "model.onnx")
            _export_onnx(logits, example_inputs(encoder), names, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Its threads would otherwise spin for a while after each run, taking the cores that the rest of
            # the request (and other requests) need: measured, 2 threads made finishing a request 6x slower.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, table: EncodedTable) -> torch.Tensor:
        batch = table.batch(slice(None))  # ids unpacked, as the model reads them
        values = [batch.sparse, batch.dense, batch.lists, batch.lengths][: len(self.names)]
        feeds = {
            name: value.numpy().astype(np.float32 if name == "dense" else np.int64, copy=False)
            for name, value in zip(self.names, values, strict=True)
        }
        outputs = self.session.run(None, feeds)  # T × (N,)
        return torch.from_numpy(np.stack(outputs, axis=1))  # (N, T) float32
