"""Diagnostic: how the pseudo-partners compare with the real held-out partners' updates on the demo, per layer: norm
relative to the twin, the share of each real partner's dW in the pool's column span and in W0's top-32 left singular span.

    OMP_NUM_THREADS=1 python benchmarks/partner_geometry.py 0      # the seed
"""
import os
import statistics as st
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from informed_protection import pseudo_partners
from trap2_hf.demo.arguments import DemoArguments
from trap2_hf.demo.pipeline import build, train_plain
from trap2_hf.offray import load_foreign_update, offray_layers
from trap2_hf.offray.foreign import canonical_path
from trap2_hf.offray.transforms import top_singular_directions

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
demo = DemoArguments(output_dir=tempfile.mkdtemp(), seed=seed)
setup = build(demo.task_set, demo.protected_task, seed, demo.lora_rank,
              {"train": demo.train_size, "validation": demo.validation_size, "test": demo.test_size})
train_plain(setup, demo, lambda m: None)
folders = pseudo_partners(setup, seed, "pseudo", tempfile.mkdtemp())
pool = [load_foreign_update(f) for f in folders]
def delta(layer, adapter):
    return (layer.scaling[adapter] * layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight).detach()
rows = []
for name, layer, _ in offray_layers(setup.model, [setup.protected]):
    path = canonical_path(name)
    real = {t: delta(layer, a) for t, a in setup.others.items()}
    own = delta(layer, setup.unprotected)
    pseudo = [p.factors[path][0] @ p.factors[path][1] for p in pool]
    # span of the pool (column space, top r per partner)
    basis = torch.linalg.qr(torch.cat([torch.linalg.svd(p)[0][:, :8] for p in pseudo], 1))[0]
    u_k, _ = top_singular_directions(layer.get_base_layer().weight, 32)
    for t, d in real.items():
        rows.append((t, d.norm() / own.norm(), sum(p.norm() for p in pseudo) / len(pseudo) / own.norm(),
                     (basis @ (basis.T @ d)).norm() / d.norm(), (u_k @ (u_k.T @ d)).norm() / d.norm()))
for t in setup.others:
    r = [x for x in rows if x[0] == t]
    print(f"{t}: ||dW_real||/||dW_twin|| {st.mean(float(x[1]) for x in r):.2f}; ||pseudo||/||dW_twin|| "
          f"{st.mean(float(x[2]) for x in r):.2f}; share of dW_real in the pool's column span {st.mean(float(x[3]) for x in r):.2f}; "
          f"in W0's top-32 left singular span {st.mean(float(x[4]) for x in r):.2f}")
out_dim = setup.model.base_model.model.encoder.layer[0].attention.self.query.get_base_layer().weight.shape[0]
print(f"a random matrix's share: pool span {(24 / out_dim) ** 0.5:.2f}, top-32 span {(32 / out_dim) ** 0.5:.2f}")
