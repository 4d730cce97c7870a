"""Kernels: the Triton kernel (tied_adamw.py: importing it imports Triton), the multi-tensor
launch engine (multi_tensor.py), the layouts kernel and host share (layout.py), the native CPU
step (native_cpu.cpp, built at first use by native_cpu.py), the compiled CPU step it falls back
to, with its bf16 rounding (tied_adamw_cpu.py, bf16_round.py; torch only). Importing this
package imports nothing of them."""
