"""seedswarm: decentralized training by shared-randomness seeds and one-byte projected gradients.

The repository root is this package; see docs/ for the protocol and README.md for usage.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 3  # 3: the guarded mean's alignment guard learns its spread (an aggregate rule change)
