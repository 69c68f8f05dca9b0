"""graphcomp: import a trained model, compress it with verified passes, build it with TVM."""

__version__ = "0.1.0"
