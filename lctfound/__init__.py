"""LCTfound engine: the lung-CT diffusion foundation model without Qt or MRML.

Everything numeric lives here (models, conditioning, checkpoints, volume I/O,
preprocessing, feature extraction, task pipelines). The MRML adapters
(`lctfound.mrml`) and the Qt-free module logic (`lctfound.logic`) build on it;
the Slicer modules and the command line are thin front ends over those.
"""

__version__ = "0.1.0"
