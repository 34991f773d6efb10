"""Pallas kernels for NVIDIA GPUs, Triton lowering (``pl.pallas_call`` + ``plgpu.CompilerParams``).

One kernel per file, stages named like FLA's:
  kkt_solve_wy.py  stages "kkt" + "solve" + "wy" fused: w, u per chunk
  h.py             stage "h": the sequential pass over chunks, state held in registers
  o.py             stage "o": the chunk outputs
  decode.py        the recurrent (decode) step for a batch of states
  fwd.py           the forward pipeline that strings them together
"""
