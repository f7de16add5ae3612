"""Developer tools of this repository, not part of the shipped package (``setup.py`` leaves them out).

- :mod:`tools.gpu_build`: the kernel account and the GPU build (``python -m tools.gpu_build --account | --build``).
- ``tools/accuracy.py``: the Fashion-MNIST accuracy study (``python tools/accuracy.py --part a ...``).
- ``tools/conformance.py``: transformers' and timm's own model tests on patched models, against the same tests
  unpatched (``python tools/conformance.py``; its pytest plugin is ``tools/conformance_plugin.py``).

Run them from the repository root, where ``tools`` and ``pruneattn`` are importable.
"""
