"""Codecs (tensor <-> bytes + JSON meta) behind one interface and one registry, and the seed's compressor."""

from .codec import Codec, CodecError, EncodedTensor, TensorMeta
from .registry import CODECS, decode_payload, make_codec, register_codec

__all__ = ["CODECS", "Codec", "CodecError", "EncodedTensor", "TensorMeta", "decode_payload", "make_codec",
           "register_codec"]
