"""Deploying where users run: ``triton`` (a Triton Inference Server model repository, and the client's
preprocessing helper)."""
