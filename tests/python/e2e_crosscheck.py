"""Independent check of wsengine's end-to-end encryption (PROTOCOL.md section 7).

Driven by tests/encryption.rs: it plays the client side of a real key exchange with
Python's `cryptography` package, which shares no code with the engine.

Protocol (one JSON object per line):
  1. prints {"public_key": <base64 of our uncompressed P-256 point>}
  2. reads  {"engine_public_key": ..., "frame": <hex of an E: frame the engine sent>,
             "reply": <a JSON message to encrypt for the engine>}
  3. prints {"plaintext": <decrypted frame as text>, "frame": <hex of our E: frame>}

Before that it checks the section 7.6 test vector, so a failure names the culprit.
"""

import base64
import json
import os
import sys

try:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as error:  # pragma: no cover - reported to the Rust test
    sys.stderr.write(
        "the Python package `cryptography` is missing ({}); "
        "install it with: python3 -m pip install cryptography==48.0.0\n".format(error)
    )
    sys.exit(3)

INFO = b"wse-encryption/aes-gcm-key"


def derive(private_key, peer_public_bytes):
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_public_bytes)
    shared = private_key.exchange(ec.ECDH(), peer)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO).derive(shared)


def open_frame(key, frame):
    if frame[:2] != b"E:" or len(frame) < 30:
        raise ValueError("not an E: frame")
    return AESGCM(key).decrypt(frame[2:14], frame[14:], None)


def seal(key, plaintext):
    iv = os.urandom(12)
    return b"E:" + iv + AESGCM(key).encrypt(iv, plaintext, None)


def public_bytes(private_key):
    return private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def check_test_vector():
    client = ec.derive_private_key(
        int("09369a3a6ac386c9afc387b76d72dfccdef9e9dd91d610e6563eebbdeefde022", 16), ec.SECP256R1()
    )
    engine_public = base64.b64decode(
        "BAeN+xvM6SBzrEwfGSOjoYNfv+PDUBMyMJXQ1/NHXpjoj524HB7vLRoQ3nhGjW9TZY26Qc1K1d0GsZNeFEga608="
    )
    key = derive(client, engine_public)
    assert key.hex() == "6b7b11f58951291d71d602cfc4cf1e275b8b25814fe1290fb8555e7166a841dd", key.hex()
    frame = bytes.fromhex(
        "453a000102030405060708090a0b"
        "5c451927fab74bf256c9df3f56e94c33e84cdec6480d2d6f0187a91e236382283622a746679975e6565c7ddaa5a482ff558b65f9d188"
        "5276fad8837fc7d126b7a5dfcb954e8a"
    )
    assert open_frame(key, frame) == b'{"c":"U","t":"echo_reply","p":{"hello":"world"},"v":1}'


def main():
    check_test_vector()
    private_key = ec.generate_private_key(ec.SECP256R1())
    print(json.dumps({"public_key": base64.b64encode(public_bytes(private_key)).decode()}), flush=True)
    request = json.loads(sys.stdin.readline())
    key = derive(private_key, base64.b64decode(request["engine_public_key"]))
    plaintext = open_frame(key, bytes.fromhex(request["frame"]))
    reply = json.dumps(request["reply"], separators=(",", ":")).encode()
    print(json.dumps({"plaintext": plaintext.decode("utf-8"), "frame": seal(key, reply).hex()}), flush=True)


if __name__ == "__main__":
    main()
