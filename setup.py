"""nucjax: instance segmentation of cell nuclei in JAX (U-Net variants, Mask R-CNN) with honest metrics."""

from setuptools import find_packages, setup

setup(
    name="nucjax",
    version="0.1.0",
    description="Nucleus instance segmentation in JAX: U-Net variants and Mask R-CNN benchmarked on DSB2018",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nucjax", "nucjax.*"]),
    install_requires=[
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-image>=0.22",
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.7",
        "grain>=0.2.12",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "pillow>=10.0",
        "tifffile>=2023.7",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # StarDist is the reference implementation of the matching metrics (an oracle in tests).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "stardist>=0.9"],
        # torch 2.13.0 is the CPU build this machine has on disk; an unpinned torch pulls a multi-GB CUDA build.
        "bench": ["torch==2.13.0", "stardist>=0.9"],
    },
)
