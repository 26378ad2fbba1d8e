"""Pinned outputs of every place outside ``crypto/`` that used to call a cryptographic
primitive directly: search keys and tokens, the display field, the archive job digest, the
synthetic keystream, the in-memory KMS wrap, the platform signing key and the BYOK
customer wrap. The values were recorded from the implementation before its primitives
moved into ``archive_kms.crypto`` (docs/adr/0008-layers.md); the moved code must produce
them byte for byte, so stored indexes, queued jobs, wrapped keys and signatures stay
readable.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import types
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from archive_kms import synthetic
from archive_kms.crypto.secrets import SecretBytes
from archive_kms.crypto.signing import Signer, Verifier
from archive_kms.errors import IntegrityError, WrongKeyError
from archive_kms.keys import memory as memory_kms
from archive_kms.keys.byok import ByokImporter, customer_wrap
from archive_kms.keys.port import WrappedKey
from archive_kms.operations import archive
from archive_kms.search import documents
from archive_kms.search.tokens import derive_search_keys

TENANT_KEY = SecretBytes(bytes(range(32)))


def _counting_urandom() -> Callable[[int], bytes]:
    """Deterministic stand-in for os.urandom: call k returns bytes k, k+1, ... (mod 256)."""
    calls = itertools.count()

    def urandom(n: int) -> bytes:
        start = next(calls)
        return bytes((start + i) % 256 for i in range(n))

    return urandom


@pytest.fixture
def search_keys():
    return derive_search_keys(TENANT_KEY, "acme")


def test_search_keys_tokens_and_mac(search_keys):
    assert search_keys.keyed("invoice") == "hCGqtsja4vbw9yQXU99gNQ"
    assert search_keys.mac(b"doc-1").hex() == "4a15882c267770f747be3566703d68ccf629cc0c54bfde5795d23a1273e1a4ce"
    assert (
        search_keys.display_key_material().reveal().hex()
        == "112f6dc94ca5db31985d64ab5ab358d26d6d77b6ed6b4639d2dba7baab815e84"
    )


DISPLAY_BLOB = (
    "AQABAgMEBQYHCAkKCwwNDg8BAgMEBQYHCAkKCwx36a/viP1ZYF4giyjFSop08jSPtpOvvVgJiP8M/NyQWyMsej1t/agT+iD5w9jfLk5+JHLQ0c6d"
    "RoOhG8rIiPOBmwP1Gtk6jfj4wbi+ZaM3A5X8gPNA1xbvSNjmoZNxoupeFdEB6/pTHrLyb+MhpShdW/IoqFkvGfq84F5d0ZUDElFh5zCxVEVD6qAw"
    "D0Rchl7ivJNdFlvQiWIudVg4DRbHvOFRoiwXegmCNVFQBlBctVILjEhC8bHhuV88mCGc+u8+TpbtFGrU0NidkfDeCldUOyliVkkn316+USvtPNLh"
    "Y2tOM6pLxb6BrycHQS4i7tmJSH7TQSUE0fMZSEGhCXy13HxWDlx0ZMQk49qzEOJ4FQ=="
)
DISPLAY_PLAINTEXT = b'{"Name":"Acme"}'


def test_display_field_seals_to_the_pinned_bytes(search_keys, monkeypatch):
    monkeypatch.setattr(documents.os, "urandom", _counting_urandom())
    assert documents.seal_display(DISPLAY_PLAINTEXT, tenant="acme", doc_id="doc-1", keys=search_keys) == DISPLAY_BLOB


def test_display_field_opens_the_pinned_bytes_and_refuses_a_flipped_bit(search_keys):
    opened = documents.open_display(DISPLAY_BLOB, tenant="acme", doc_id="doc-1", keys=search_keys)
    assert opened.rstrip(b" ") == DISPLAY_PLAINTEXT
    raw = bytearray(base64.b64decode(DISPLAY_BLOB))
    raw[-1] ^= 1
    with pytest.raises(IntegrityError, match="failed authentication"):
        documents.open_display(base64.b64encode(raw).decode(), tenant="acme", doc_id="doc-1", keys=search_keys)
    with pytest.raises(IntegrityError, match="failed authentication"):  # bound to the document id
        documents.open_display(DISPLAY_BLOB, tenant="acme", doc_id="doc-2", keys=search_keys)


def test_archive_job_content_digest():
    keychain = types.SimpleNamespace(search_key_material=lambda tenant: SecretBytes(bytes(range(32, 64))))
    spec = types.SimpleNamespace(tenant_id="acme", job_id="job-7")
    assert (
        archive._content_digest(keychain, spec, b"payload")
        == "hmac-sha256:0fc90fdd43c33948c6b76f333ab97d3ac54a2ffe1893baf92caa9b8e7db27fda"
    )


def test_synthetic_keystream():
    chunks: Iterator[bytes] = synthetic.keystream(b"seed", 70_000, chunk=4096)
    data = b"".join(chunks)
    assert len(data) == 70_000
    assert data[:16].hex() == "3797d76aa831be2c2a2d6d70bed51eb2"
    assert hashlib.sha256(data).hexdigest() == "e6f7aec36b42860025bf0a50eb58a51b9951ddafd10d275e9a50a5b76b0c98fd"


MEMORY_WRAPPED = bytes.fromhex(
    "000102030405060708090a0b5762f28771800f264dc24c1b424f5e6531cee74b"
    "f1de0efa27f30be8b709a707ea82f75fb6b12972976d36905964383c"
)
MEMORY_CONTEXT = {"tenant": "acme", "purpose": "l2"}


@pytest.fixture
def pinned_memory_key():
    kms = memory_kms.MemoryKms()
    ref = kms.create_key("pinned")
    kms._keys["pinned"].versions = [SecretBytes(bytes(range(100, 132)))]  # known key material
    return kms.provider(ref)


def test_memory_kms_wrap_is_pinned(pinned_memory_key, monkeypatch):
    monkeypatch.setattr(memory_kms.os, "urandom", _counting_urandom())
    wrapped = pinned_memory_key.wrap(SecretBytes(bytes(range(200, 232))), context=MEMORY_CONTEXT)
    assert (wrapped.key_ref, wrapped.algorithm) == ("memory://pinned/1", "memory:AES-256-GCM")
    assert wrapped.ciphertext == MEMORY_WRAPPED


def test_memory_kms_unwraps_the_pinned_bytes_only_in_their_context(pinned_memory_key):
    wrapped = WrappedKey(key_ref="memory://pinned/1", algorithm="memory:AES-256-GCM", ciphertext=MEMORY_WRAPPED)
    assert pinned_memory_key.unwrap(wrapped, context=MEMORY_CONTEXT).reveal() == bytes(range(200, 232))
    with pytest.raises(WrongKeyError):
        pinned_memory_key.unwrap(wrapped, context={**MEMORY_CONTEXT, "tenant": "globex"})


SIGNER_SEED = bytes(range(32))
SIGNATURE = bytes.fromhex(
    "593880c70f43f4ed71ed5eec6a122d657c7d696127f8b9cfd0db105a4506f6b8"
    "f1e4d6f17ac86c92ef2dd1466b16bacb1b0ab463dfeb6333b09b8ec960a80f04"
)
PUBLIC_PEM = b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAA6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=\n-----END PUBLIC KEY-----\n"


def test_platform_signature_is_pinned():
    signer = Signer(Ed25519PrivateKey.from_private_bytes(SIGNER_SEED))
    assert signer.key_id == "ed25519:56475aa75463474c"
    assert signer.public_key_pem() == PUBLIC_PEM
    assert signer.sign(b"message", purpose="test") == SIGNATURE
    verifier = Verifier.from_public_pem(PUBLIC_PEM)
    verifier.verify(b"message", SIGNATURE, key_id=signer.key_id, purpose="test")
    with pytest.raises(IntegrityError):  # the purpose is part of what is signed
        verifier.verify(b"message", SIGNATURE, key_id=signer.key_id, purpose="other")


@pytest.fixture(scope="module")
def rsa_wrapping_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_byok_customer_wrap_is_rsa_oaep_sha256(rsa_wrapping_key):
    pem = rsa_wrapping_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    material = SecretBytes(bytes(range(32)))
    wrapped = customer_wrap(pem.decode("ascii"), material)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert len(wrapped) == 256 and rsa_wrapping_key.decrypt(wrapped, oaep) == material.reveal()


def test_byok_import_parameters_give_the_kms_public_key_as_pem(rsa_wrapping_key):
    from datetime import UTC, datetime

    public = rsa_wrapping_key.public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    arn = "arn:aws:kms:us-east-1:111122223333:key/0b5f1c9e-6f3c-4a57-9d1e-2f7f2a0c1d11"

    class Kms:
        def get_parameters_for_import(self, **kwargs):
            return {"PublicKey": der, "ImportToken": b"token", "ParametersValidTo": datetime(2030, 1, 1, tzinfo=UTC)}

    params = ByokImporter(Kms()).import_parameters(f"aws-kms://{arn}", wrapping_key_spec="RSA_2048")
    assert params.public_key_pem.encode("ascii") == public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
