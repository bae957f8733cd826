"""cribo: CrIBo (Cross-Image Object-Level Bootstrapping, ICLR 2024) for dense self-supervised features."""

__version__ = "0.1.0"
