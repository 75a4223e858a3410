"""SEAL internals, the hazardous layer under ``fedhe.he``: everything that touches TenSEAL.

``context`` holds TenSEAL contexts behind the opaque ``SecretContext`` and ``EvaluationContext``;
``io`` moves SEAL objects in and out of bytes (uncompressed only, headers checked before SEAL
parses them); ``format`` builds plaintexts from coefficients and the compact ciphertext wire
form; ``codec`` is what the SEAL codecs share, ``ckks_seeded`` and ``bfv_packed`` the codecs.

Private: nothing outside ``fedhe.he`` imports these modules (``tests/unit/test_architecture.py``
checks it). Programs use ``fedhe.he``: ``load_secret_context`` / ``load_evaluation_context``,
then ``codec_for``.
"""
