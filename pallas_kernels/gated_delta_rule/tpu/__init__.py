"""Pallas kernels for TPU (Mosaic).

  chunk_fwd.py  the chunked forward, stages kkt/solve/wy/h/o fused in one kernel that walks the
                chunks of one (batch, value head) sequentially with the state in VMEM scratch
                (the grid's chunk axis is "arbitrary"; batch and heads are "parallel")
  chunk_bwd.py  the chunked backward: the chunk states recomputed by the forward kernel, then one
                kernel walks the chunks backwards (d(state) in VMEM scratch) and computes each
                chunk's d(q), d(k), d(v), d(G), d(beta) (the math of kernel_math, shared with
                the GPU backward stages)
  decode.py     the recurrent (decode) step for a batch of states

TPU block rules (last two block dims divisible by (8, 128) or equal to the array's) make the
kernels use a head-major layout [B, H, T, D]; the wrappers transpose from FLA's [B, T, H, D].
"""
