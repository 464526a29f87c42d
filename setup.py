"""vtok: visual tokenizers (FQGAN, FlexTok, TexTok) and the generators that run on them."""
from setuptools import find_packages, setup

# Ranges, not pins: torch 2.14.1 / torchvision 0.29.1 (the builds on the CI disk) satisfy them.
INSTALL_REQUIRES = [
    "torch>=2.4,<=2.14.1",
    "torchvision>=0.19,<=0.29.1",
    "numpy>=1.24,<3",
    "pillow>=10.0",
    "simplejpeg>=1.7,<2",
    "webdataset>=1.0.2,<2",
    "mosaicml-streaming>=0.11,<0.14",
    "omegaconf>=2.3,<2.5",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "einops>=0.8",
    "open-clip-torch>=2.26",
    "timm>=1.0",
    "tensorboard>=2.14",
    "lpips>=0.1.4",  # only for its shipped VGG linear-head weights (7 KB); vtok computes LPIPS itself
    "torch-fidelity>=0.3,<0.5",  # the FID Inception-v3 port (weights read by vtok, without pickle)
    # T5 encoders and captioners for `vtok precompute text-emb` / `captions` (4.57.6 tested).
    "transformers>=4.45,<5",
    # AutoencoderKL for `vtok precompute latents` (and FlexTok's VAE). 0.39.0 is tested; 0.42 pulls
    # huggingface-hub 2.x, which transformers 4.x refuses, hence the upper bound.
    "diffusers>=0.30,<0.40",
]

EXTRAS = {
    # deepspeed builds from its sdist: install it after torch with
    # DS_BUILD_OPS=0 pip install --no-build-isolation 'vtok[deepspeed]'
    "deepspeed": ["deepspeed>=0.15,<0.20"],
    "test": ["pytest>=8.0", "pytest-timeout>=2.3"],
    "wandb": ["wandb>=0.17"],
}

setup(
    name="vtok",
    version="0.1.0",
    description="Train visual tokenizers and the generators that run on them, from a laptop to a cluster.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vtok", "vtok.*"]),
    package_data={"vtok.plan": ["gpus.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["vtok=vtok.cli:main"]},
    license="Apache-2.0",
)
