"""What a GPU would do with pruneattn's kernels, derived without one (``python -m tools.gpu_build``).

- :mod:`.hooks`, :mod:`.account`, :mod:`.traffic`, :mod:`.nxn`: the exact bytes and ``tl.dot`` FLOPs of
  every Triton kernel, counted in Triton's CPU interpreter, beside floors and models of SDPA and the
  eager path (``--account``).
- :mod:`.launches`, :mod:`.build`, :mod:`.arch`, :mod:`.suite`: every kernel launch the public ops make,
  compiled for real GPU targets (sm_80, sm_90, ...) with each autotune candidate, and the compiler's
  registers, spills, shared memory and tensor-core instructions (``--build``).
- :mod:`.report`, :mod:`.child`, ``__main__``: their Markdown, their subprocesses and their command line.
"""
