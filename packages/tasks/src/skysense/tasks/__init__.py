"""SkySense tasks: pre-training, fine-tuning, evaluation, inference, export and the `skysense`
command. This distribution wires the others together (kernels, encoders, losses, data)."""

__version__ = "0.1.0"
