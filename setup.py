"""codajax: Convolutional Dynamic Alignment Networks (CoDA-Nets) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="codajax",
    version="0.1.0",
    description="CoDA-Nets (Böhle, Fritz, Schiele, CVPR 2021) in JAX/Flax, with "
                "explanations composed from the network's own dynamic matrices.",
    packages=setuptools.find_packages(include=["codajax", "codajax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "absl-py>=2.1",
        "chex>=0.1.90",
        "clu>=0.0.12",
        "flax>=0.12",
        "jax>=0.10",
        "matplotlib>=3.9",
        "ml-collections>=1.1",
        "numpy>=2.0",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "scikit-learn>=1.5",      # The bundled digits of the embedded default.
        # CLU's TensorBoard writers need tensorflow and tensorboard but do not
        # declare them; TF is used on the host only (input and event files).
        "tensorboard>=2.21",
        "tensorflow-cpu>=2.21",
        "tensorflow-datasets>=4.9.10",
    ],
    extras_require={
        # The notebooks run in the tests too (nbclient on the venv's ipykernel).
        # The explorer's tests drive its HTTP API and its page in a headless
        # chromium (Debian's chromium + chromium-driver, which .ci/run installs).
        "test": ["pytest>=8", "pytest-xdist>=3.6", "hypothesis>=6.100", "pyflakes>=3.2",
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 "gradio>=6.31", "gradio_client>=2.7", "selenium>=4.30"],
        # The explanation explorer in the browser (python -m codajax.explore).
        "app": ["gradio>=6.31"],
        # Only to read the authors' .pkl/.pt checkpoints (codajax.convert).
        "torch": ["torch>=2.4"],
        # Only for the LIME baseline (codajax.attribution, method "lime").
        "lime": ["lime>=0.2.0.1", "scikit-image>=0.22"],
        # Only to write and read explanation videos (codajax.video): GIF through
        # Pillow, MP4 through the ffmpeg binary that imageio-ffmpeg ships.
        "video": ["imageio>=2.34", "imageio-ffmpeg>=0.5"],
    },
)
