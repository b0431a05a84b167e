"""skiptron: one import namespace (`skiptron.*`) mapped from the top-level folders."""
from setuptools import setup

PACKAGES = {
    "skiptron.training": "training",
    "skiptron.training.checkpoint": "training/checkpoint",
    "skiptron.training.kernels": "training/kernels",
    "skiptron.training.hf": "training/hf",
    "skiptron.parallel": "parallel",
    "skiptron.tools": "tools",
    "skiptron.configs": "configs",
}

setup(
    name="skiptron",
    version="0.1.0",
    description="Distributed LLM pretraining with learned, load-balanced per-token layer skipping",
    python_requires=">=3.11",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"skiptron.configs": ["*.yaml"], "skiptron.training.kernels": ["*.cpp"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "megatron-core>=0.12",
        "webdataset>=0.2.90",
        "tokenizers>=0.19",
        "pydantic>=2.5",
        "pyyaml>=6",
        "rich>=13",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "safetensors>=0.4",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6"],
        "eval": ["transformers>=5.0", "lm-eval>=0.4.8", "accelerate>=1.0", "safetensors>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "skiptron-train=skiptron.tools.train:main",
            "skiptron-data=skiptron.tools.data:main",
            "skiptron-plot=skiptron.tools.plot:main",
            "skiptron-bench=skiptron.tools.bench:main",
            "skiptron-bench-srupp=skiptron.tools.bench_srupp:main",
            "skiptron-bench-routing=skiptron.tools.bench_routing:main",
            "skiptron-bench-routers=skiptron.tools.bench_routers:main",
            "skiptron-bench-pipeline=skiptron.tools.bench_pipeline:main",
            "skiptron-bench-checkpoint=skiptron.tools.bench_checkpoint:main",
            "skiptron-bench-faults=skiptron.tools.bench_faults:main",
            "skiptron-bench-quality=skiptron.tools.bench_quality:main",
            "skiptron-bench-data=skiptron.tools.bench_data:main",
            "skiptron-bench-memory=skiptron.tools.bench_memory:main",
            "skiptron-convert=skiptron.tools.convert:main",
            "skiptron-finetune=skiptron.tools.finetune:main",
            "skiptron-compress=skiptron.tools.compress:main",
            "skiptron-gpu-check=skiptron.tools.gpu_check:main",
            "skiptron-study=skiptron.tools.study:main",
        ]
    },
)
