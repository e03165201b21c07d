"""aa-lightning: align any-modality models with PyTorch Lightning."""

__version__ = "0.1.0"
