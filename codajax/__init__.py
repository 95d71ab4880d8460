"""codajax: Convolutional Dynamic Alignment Networks in JAX/Flax."""
__version__ = "0.1.0"
