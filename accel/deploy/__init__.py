"""Deployment: the bundle stage (``bundle``) and the Triton Inference Server model repository
(``triton``, with the Python-backend sampler ``triton_bls``)."""
