"""llmos: an operating system for LLM inference on one machine."""

__version__ = "0.1.0"
