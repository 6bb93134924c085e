"""Codecs (tensor <-> bytes + JSON meta) behind one interface and one registry, the seed's compressor, and
users' compressors registered as codecs (`register_compressor`)."""

from .codec import Codec, CodecError, EncodedTensor, TensorMeta
from .compressor_codec import CompressorCodec, register_compressor
from .registry import CODECS, decode_payload, make_codec, register_codec

__all__ = ["CODECS", "Codec", "CodecError", "CompressorCodec", "EncodedTensor", "TensorMeta", "decode_payload",
           "make_codec", "register_codec", "register_compressor"]
