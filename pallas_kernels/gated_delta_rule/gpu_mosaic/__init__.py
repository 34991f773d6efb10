"""Pallas kernels for NVIDIA Hopper GPUs, Mosaic GPU lowering (``plgpu.kernel``: TMA, WGMMA).

  state_output.py  stages "h" and "o" fused: the sequential pass over chunks with the state in
                   registers, writing each chunk's outputs (and the final state)
  fwd.py           the forward pipeline: cumsum (XLA), kkt/solve/wy (gpu_triton), state_output
The backward and the decode step of impl="pallas_mosaic_gpu" are gpu_triton's kernels (ops.py).
"""
