"""Secure aggregation (ADR 0010): what sites and the aggregator share to mask, sign and unmask.

- ``messages``: the wire models (advertisement, roster, upload statement, transcript, answer);
- ``statements``: the exact bytes every signature, hash and commitment covers;
- ``keys``: per-attempt X25519 keys, the pairwise keys they give, sealed shares;
- ``masks``: AES-CTR masks over packed plaintext coefficients modulo t;
- ``shares``: Shamir t-of-N sharing of the self-mask seeds.

The site's side of the protocol is ``client_agent.secure_aggregation``; the aggregator's is
``aggregator.unmasking``.
"""
