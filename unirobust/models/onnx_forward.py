"""An ONNX Runtime copy of a text adapter's inference forward: the same logits, faster on CPU.

Word-substitution attacks spend almost all their time in victim forward passes (issue 6), and on a
CPU ONNX Runtime runs a small encoder faster than eager PyTorch: all-MiniLM-L6-v2 on SST-2 sentences,
batch 32, 2 threads, about 1.3x the sentences per second, with logits equal to about 1e-6
(``bench/bench_word_attacks.py``). The copy is exported once from the adapter's own
``tokenize -> embed -> logits`` path (so prompt heads and pair inputs export too) and checked against
the eager model on a batch of another size and length before use; if the export does not reproduce
the model, it raises instead of returning wrong scores. It is a frozen snapshot: a model that trains
on needs a new one. Needs the ``onnx`` extra (``pip install 'unirobust[onnx]'``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import Tensor, nn

INSTALL = "the onnx backend needs onnxruntime and onnx: pip install 'unirobust[onnx]'"
#: texts the export is traced on, and the different-shape batch it is checked on
TRACE_TEXTS = ["a short text", "another, somewhat longer text to trace the export on"]
CHECK_TEXTS = ["one", "a check of the exported forward on a batch of another size", "and length too"]


class _Forward(nn.Module):
    """``tokenize`` output tensors (in ``keys`` order) -> logits, through the adapter's own path."""

    def __init__(self, adapter, keys: list[str]):
        super().__init__()
        self.adapter, self.keys = adapter, keys

    def forward(self, *tensors: Tensor) -> Tensor:
        batch = dict(zip(self.keys, tensors))
        return self.adapter.logits(self.adapter.embed(batch), batch)


def _texts(adapter, texts: list[str]):
    """``texts`` shaped as the adapter's inputs: plain strings, or (first, second) pairs."""
    fields = len(getattr(adapter, "text_fields", ["text"]))
    return texts if fields == 1 else [tuple([t] * fields) for t in texts]


class OnnxForward:
    """Logits of a tokenized batch (dict of tensors) from an ONNX Runtime session of ``adapter``.

    ``threads`` defaults to torch's intra-op thread count, so both backends use the same cores.
    """

    def __init__(self, adapter, threads: int | None = None, atol: float = 1e-4):
        try:
            import onnx  # noqa: F401  (torch's exporter writes through it)
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError(INSTALL) from err
        device = next(adapter.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"the onnx backend runs on the CPU; this model is on {device} "
                             "(use backend: torch on accelerators)")
        sample = adapter.tokenize(_texts(adapter, TRACE_TEXTS))
        self.keys = sorted(k for k, v in sample.items() if torch.is_tensor(v))
        axes = {k: {d: f"{k}_{d}" for d in range(sample[k].dim())} for k in self.keys}
        axes["logits"] = {0: "batch"}
        buffer = io.BytesIO()
        was_training = adapter.training
        adapter.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer and deprecation chatter, not user-actionable
                torch.onnx.export(_Forward(adapter, self.keys), tuple(sample[k] for k in self.keys), buffer,
                                  input_names=self.keys, output_names=["logits"], dynamic_axes=axes,
                                  opset_version=17, dynamo=False)
        except Exception as err:
            raise RuntimeError(f"this model could not be exported to ONNX ({err}); use backend: torch") from err
        finally:
            adapter.train(was_training)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]  # the export drops inputs logits never read
        self._check(adapter, atol)

    def __call__(self, batch: dict) -> Tensor:
        feed = {k: batch[k].cpu().numpy() for k in self.inputs}
        return torch.from_numpy(np.asarray(self.session.run(["logits"], feed)[0]))

    def _check(self, adapter, atol: float) -> None:
        """The export must reproduce the eager logits on a batch of another size and length (a trace
        that froze a shape would not)."""
        batch = adapter.tokenize(_texts(adapter, CHECK_TEXTS))
        was_training = adapter.training
        adapter.eval()
        with torch.no_grad():
            expected = adapter.logits(adapter.embed(batch), batch).float()
        adapter.train(was_training)
        got = self(batch)
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol, rtol=1e-3):
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
            raise RuntimeError(f"the ONNX export of this model does not reproduce its logits (max difference "
                               f"{diff}); use backend: torch")


#: one exported model at a time: (adapter id, weight versions, threads) -> (adapter, its OnnxForward);
#: the adapter is held so its id cannot be reused by another model while cached
_CACHE: dict[tuple, tuple] = {}


def onnx_forward(adapter) -> OnnxForward:
    """``adapter``'s ONNX copy, exported once per weights version: the attacks of one evaluation
    share it, and a model that trained since gets a fresh export."""
    key = (id(adapter), tuple(p._version for p in adapter.parameters()), torch.get_num_threads())
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = (adapter, OnnxForward(adapter))
    return _CACHE[key][1]
