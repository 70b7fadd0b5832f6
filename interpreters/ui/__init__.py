"""The local, read-only web UI (``python -m stroma ui STORE``): the extra ``ui``
(``pip install 'stroma[ui]'``: Starlette and uvicorn). See ``interpreters.ui.app``."""

__all__ = ()
