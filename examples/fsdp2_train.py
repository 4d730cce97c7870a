"""FSDP2 + TiedAdamW, complete: `torchrun --nproc_per_node 2 examples/fsdp2_train.py`."""
import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from tiedadam import TiedAdamW
from tiedadam.integrations import fsdp as tfsdp

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--ckpt", default="examples/out/fsdp2_ckpt")  # git-ignored
args = ap.parse_args()

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
device = f"cuda:{dist.get_rank()}" if torch.cuda.is_available() else "cpu"
if device != "cpu":
    torch.cuda.set_device(device)
mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)]).to(device)
mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
for layer in model:
    fully_shard(layer, mesh=mesh, mp_policy=mp)
fully_shard(model, mesh=mesh, mp_policy=mp)
opt = TiedAdamW(model.parameters(), lr=3e-4, beta=0.95, weight_decay=0.1)

for step in range(args.steps):
    x = torch.randn(32, 512, device=device)
    loss = model(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step == args.steps // 2 - 1:
        tfsdp.save(args.ckpt, model, opt)  # sharded DCP checkpoint

tfsdp.load(args.ckpt, model, opt)  # on any number of ranks, also into an unsharded model
if dist.get_rank() == 0:
    print(f"done: loss {loss.item():.4f}, state on rank 0: {opt.state_bytes()}")
dist.destroy_process_group()
