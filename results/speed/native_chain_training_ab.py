"""A/B of the native training chain (``native_chain_training.patch`` in this folder, not merged):
the ResNet-20 9x training step (batch 128, float32 NCHW, 2 threads) with every factorized layer's
``native_chain`` on and off, alternating, 8 rounds of 2 steps, median. Needs the patch applied:

    git apply results/speed/native_chain_training.patch
    .venv/bin/python results/speed/native_chain_training_ab.py stt tt tucker
"""
import sys, time, statistics, torch, torch.nn.functional as F
sys.path.insert(0, "bench")
from train_speed import make
from stpnet.nn import FactorizedLayer
torch.set_num_threads(2)
for fmt in sys.argv[1:]:
    m = make('resnet20', fmt).train()
    layers = [l for l in m.modules() if isinstance(l, FactorizedLayer)]
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(128, 3, 32, 32); y = torch.randint(0, 10, (128,))
    def step():
        loss = F.cross_entropy(m(x), y); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    res = {True: [], False: []}
    for r in range(8):
        for nat in (True, False):
            for l in layers: l.native_chain = nat
            step()
            t0 = time.perf_counter(); step(); step(); res[nat].append((time.perf_counter() - t0) / 2)
    a, b = statistics.median(res[True]) * 1e3, statistics.median(res[False]) * 1e3
    print(f"{fmt}: step native {a:.1f} ms, torch {b:.1f} ms, ratio {a/b:.2f}")
