"""ftdeploy: fine-tune a pretrained PyTorch model, compress it and ship a verified ONNX file.

The stages are plain modules with a Python API (``ftdeploy.train``, ``ftdeploy.export``, ...);
``ftdeploy.cli`` is a thin command line over them. Importing this package stays light: torch is
only imported by the stages that need it, so serving works without it.
"""

__version__ = "0.1.0"
