"""A/B of how the fused 1x1 stages apply a factor: batched product (``_mix``) or 1x1 ``conv1d``
(``conv1x1_mix``), in PyTorch and under ONNX Runtime, on ResNet-20 at 9x (TT, STT, STR), batch 1 and 32,
one thread; ratios to the dense network (ONNX rows to the dense ONNX export).

Run (from bench/): OMP_NUM_THREADS=1 ../.venv/bin/python onnx_mix.py
"""

import torch

import stpnet
from stpnet.functional.contract import _mix, conv1x1_mix
from stpnet.models import build_model
from stpnet.deploy.fused import FusedLayer

from latency import onnx_session, time_in_blocks  # bench/latency.py

torch.set_num_threads(1)
torch.manual_seed(0)
dense = build_model("resnet20").eval()
for fmt in ["tt", "stt", "str"]:
    small, _ = stpnet.compress(dense, fmt, compression=9, t=2 if fmt.startswith("s") else None)
    with_bmm, with_conv = stpnet.fuse(small.eval()), stpnet.fuse(small.eval())
    for m in with_bmm.modules():
        if isinstance(m, FusedLayer):
            m.mix = _mix
    for m in with_conv.modules():
        if isinstance(m, FusedLayer):
            m.mix = conv1x1_mix
    for b in (1, 32):
        x = torch.randn(b, 3, 32, 32)
        sec = time_in_blocks({"dense": dense, "bmm": with_bmm, "conv1d": with_conv,
                              "onnx_dense": onnx_session(dense, x, 1), "onnx_bmm": onnx_session(with_bmm, x, 1),
                              "onnx_conv1d": onnx_session(with_conv, x, 1)}, x, 30)
        print(fmt, b, {k: round(v / sec["onnx_dense" if k.startswith("onnx") else "dense"], 2) for k, v in sec.items()},
              flush=True)
