import sys, time, statistics, torch
from torch.utils.cpp_extension import load
src, sr, n = sys.argv[1], sys.argv[2] == "sr", int(float(sys.argv[3]))
torch.set_num_threads(2)
flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
mod = load(name="proto_" + src.split("/")[-1][:-4], sources=[src], extra_cflags=flags, extra_ldflags=["-fopenmp"])
g = torch.randn(n); p = torch.randn(n)
v = (torch.rand(n) + 0.5).bfloat16(); m = (torch.randn(n) * 0.1).bfloat16()
s = torch.tensor([1 - 1e-5, 0.05, 0.95, 0.05, 1e-3, 0.5, 1e-8, 1.0, 2.0, 1.0, 127.0])
keys = torch.tensor([12345, 678], dtype=torch.int32)
ts = []
for i in range(12):
    t0 = time.perf_counter(); mod.step(p, g, m, v, None, s, keys, False, sr, False); ts.append(time.perf_counter() - t0)
print(src.split("/")[-1], "bf16", "sr" if sr else "nearest", n, f"{statistics.median(ts[2:])*1e3:.1f} ms")
