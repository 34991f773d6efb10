"""Pallas kernels for NVIDIA GPUs, Triton lowering (``pl.pallas_call`` + ``plgpu.CompilerParams``).

One kernel per file, stages named like FLA's:
  kkt_solve_wy.py  stages "kkt" + "solve" + "wy" fused: w, u per chunk
  h.py             stage "h": the sequential pass over chunks, state held in registers
  o.py             stage "o": the chunk outputs
  decode.py        the recurrent (decode) step for a batch of states
  fwd.py           the forward pipeline that strings them together
Backward (recomputes w, u, h, v_new with the forward kernels):
  dv_local.py      stage "dv": d(v_new) from the outputs of the same chunk (a kernel of its own
                   only without BlockSizes.fuse_dv_local, or with seq_splits > 1)
  dh.py            stage "dh": the reverse pass over chunks, d(state) held in registers
  dqkwg.py         stage "dqkwg": d(q), d(k), d(w), d(G) through the states and the attention
  wy_bwd.py        the backward of kkt/solve/wy: d(k), d(v), d(beta), d(G) through w and u
  bwd.py           the backward pipeline
"""
