"""hetserve: serve one neural network across a GPU and the CPU cores of the same box."""

__version__ = "0.1.0"
