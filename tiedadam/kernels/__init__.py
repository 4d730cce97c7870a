"""Triton kernels and the multi-tensor launch engine. Importing this package imports triton."""
