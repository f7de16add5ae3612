"""What a GPU would do, derived without one.

- :mod:`.hooks`, :mod:`.account`, :mod:`.traffic`, :mod:`.nxn`: the exact bytes and ``tl.dot`` FLOPs of
  every Triton kernel, counted in Triton's CPU interpreter, beside floors and models of SDPA and the
  eager path (``pruneattn bench --account``).
- :mod:`.launches`, :mod:`.build`, :mod:`.arch`: every kernel launch the public ops make, compiled for
  real GPU targets (sm_80, sm_90, ...) with each autotune candidate, and the compiler's registers,
  spills, shared memory and tensor-core instructions (``pruneattn bench --build``).
- :mod:`.report`, :mod:`.cli`: their Markdown and command line.
"""
