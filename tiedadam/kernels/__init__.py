"""Kernels: the Triton kernel (tied_adamw.py: importing it imports Triton), the multi-tensor
launch engine (multi_tensor.py), the layouts kernel and host share (layout.py), and the compiled
CPU step with its bf16 rounding (tied_adamw_cpu.py, inductor_codegen.py, bf16_round.py; torch
only). Importing this package imports nothing of them."""
