"""wsi-pipeline: slide -> coords.h5 -> features.h5 -> bag -> model -> scores -> exports."""

__version__ = "0.1.0"
