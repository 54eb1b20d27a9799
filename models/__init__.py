"""Flax NNX model families for jaxpage (installed as ``jaxpage.models``)."""
