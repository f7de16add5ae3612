from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="pruneattn",
    version="0.1.0",
    description="Attention-diversity token pruning for vision transformers, with fused Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pruneattn", "pruneattn.*"]),
    package_data={"pruneattn.fashion_mnist": ["data/*"]},
    python_requires=">=3.10",
    install_requires=[
        # torch.library.custom_op / register_autograd / register_fake: 2.4; SDPA's `scale=`: 2.1.
        "torch>=2.4",
        # Kernels use tl.sort / tl.cumsum / input_precision=; tested with triton 3.6 (GPU) and 3.8 (interpreter).
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        # tqdm: progress bars of the demo, the training and the benchmarks (they run without them).
        "models": ["timm>=1.0", "transformers>=4.40", "matplotlib", "tqdm"],
        "bench": ["matplotlib", "tqdm"],
        "test": [
            "pytest>=8",
            "pytest-xdist",
            "hypothesis",
            "timm>=1.0",
            "transformers>=4.40",
            "open_clip_torch",
            "matplotlib",
        ],
    },
    entry_points={"console_scripts": ["pruneattn=pruneattn.cli:main"]},
)
