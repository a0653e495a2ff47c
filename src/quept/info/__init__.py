"""What an artifact holds, read from its JSON and tensor headers alone: no weights are loaded
and no base model is needed (``quept info PATH``).

:func:`describe` returns a JSON-ready dict for any folder quept reads or writes (elastic,
compact, packed, compressed-tensors, ONNX, a plain Hugging Face model) or a ``.gguf`` file;
:func:`render` turns it into the lines ``quept info`` prints.
"""

from quept.info.describe import EXPORT_JSON, InfoError, describe
from quept.info.render import render

__all__ = ["EXPORT_JSON", "InfoError", "describe", "render"]
