"""flowtok: FlowTok text-to-image and image-to-text by flow matching between 1D token latents."""

__version__ = "0.1.0"
