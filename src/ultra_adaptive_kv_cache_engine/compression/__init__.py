"""Codecs (tensor <-> bytes + JSON meta) behind one interface and one registry, the seed's compressor,
users' compressors registered as codecs (`register_compressor`), and the pool formats of quantized KV blocks
(`POOL_FORMATS`)."""

from .codec import Codec, CodecError, EncodedTensor, TensorMeta
from .compressor_codec import CompressorCodec, register_compressor
from .pool_formats import POOL_FORMATS, PoolFormat, get_pool_format
from .registry import CODECS, decode_payload, make_codec, register_codec

__all__ = ["CODECS", "POOL_FORMATS", "Codec", "CodecError", "CompressorCodec", "EncodedTensor", "PoolFormat",
           "TensorMeta", "decode_payload", "get_pool_format", "make_codec", "register_codec", "register_compressor"]
