"""Mistral: the LLaMA layout without bias flags (and an optional sliding window)."""

from cfsp.arch.base import DecoderAdapter


class MistralAdapter(DecoderAdapter):
    name = "mistral"
    model_types = ("mistral",)
