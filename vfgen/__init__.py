"""vfgen: render production files for multi-instance vLLM deployments."""

__version__ = "0.1.0"
