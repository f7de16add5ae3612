from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="pruneattn",
    version="0.1.0",
    description="Attention-diversity token pruning for vision transformers, with fused Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # package_dir {"": "."}: an editable install puts the clone on sys.path (a .pth file), so that
    # ``import pruneattn`` finds the package even run from the folder that holds the clone, whose own
    # folder would otherwise be imported as an empty namespace package.
    package_dir={"": "."},
    packages=find_packages(include=["pruneattn", "pruneattn.*"]),
    package_data={"pruneattn.fashion_mnist": ["data/*"]},
    # The floors are the lowest versions tools/matrix.sh tests (pruneattn/_versions.py, the README's
    # supported-versions table); Python 3.11: transformers 5.21 and later need it.
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.11",
        # Installed with torch, which pins it (torch 2.11: 3.6.0). Triton's CPU interpreter with
        # triton < 3.7.1 needs numpy < 2.4: refused with the fix at its first use (GPU runs take any).
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=1.26",
    ],
    extras_require={
        # tqdm: progress bars of the demo, the training and the benchmarks (they run without them).
        # accelerate: transformers' from_pretrained(..., device_map=...) needs it (the pretrained LLaVA example).
        "models": ["timm>=1.0.31", "transformers>=5.24", "matplotlib", "tqdm", "accelerate"],
        "bench": ["matplotlib", "tqdm"],
        "test": [
            "pytest>=8",
            "pytest-xdist",
            "hypothesis",
            "timm>=1.0.31",
            "transformers>=5.24",
            "open_clip_torch",
            "matplotlib",
        ],
    },
    entry_points={"console_scripts": ["pruneattn=pruneattn.cli:main"]},
)
