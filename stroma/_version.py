"""The version of stroma, defined here only: packaging (pyproject.toml's dynamic version),
``stroma.__version__`` and the effect log's header all read it."""

__version__ = "0.4.0"

__all__ = ("__version__",)
