"""dpsynth: differentially private synthetic patient records (single site core; Flower adapters live in client/ and server/)."""

__version__ = "0.1.0"
