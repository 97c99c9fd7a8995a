"""Flower 1.42's secure-aggregation primitives (SecAgg+): Shamir shares, key agreement, encryption, quantization.

fedseg runs the SecAgg+ protocol itself (common/secagg.py, client/secagg.py,
server/secure_sum.py) with Flower's own cryptography, which is internal API.
"""

from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

__all__ = [
    "bytes_to_private_key",
    "bytes_to_public_key",
    "combine_shares",
    "create_shares",
    "decrypt",
    "dequantize",
    "encrypt",
    "generate_key_pairs",
    "generate_shared_key",
    "private_key_to_bytes",
    "public_key_to_bytes",
    "quantize",
    "share_keys_plaintext_concat",
    "share_keys_plaintext_separate",
]
