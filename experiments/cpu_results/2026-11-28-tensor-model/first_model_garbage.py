"""How much the first bench.py row leaves to the garbage collector, as bench.py ran before it
collected between rows (one dcls row at SHD size on the CPU, ~15 s):

    python experiments/cpu_results/2026-11-28-tensor-model/first_model_garbage.py

The reference row's first forward through spikingjelly's LIF imports torch._dynamo lazily;
frames of that import end in a reference cycle with the caller's frames, which hold the model,
its last activations and the row's locals. Uncollected, that memory was counted in the peaks
of the rows after it.
"""

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # experiments/
import bench  # noqa: E402

gc.disable()
bench.collect = lambda device: None  # as bench.py was
bench.main(
    ["--device", "cpu", "--networks", "shd", "--sigma", "0.23", "--backends", "dcls", "--repeats", "1"]
)
gc.set_debug(gc.DEBUG_SAVEALL)
gc.collect()
storages = {}
for obj in gc.garbage:
    if isinstance(obj, torch.Tensor):
        storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
print(f"tensors only the collector frees: {len(storages)}, {sum(storages.values()) / 2**20:.1f} MiB")
