"""The sans-IO protocol core: every protocol decision, no sockets, clocks, threads or torch.

State machines and pure functions fed with messages and the current time, returning effects that
a driver (the asyncio daemon in ``node.daemon``, the virtual-time simulator in ``sim``) carries
out. Importing this package never imports torch or libp2p (``tests/test_architecture.py``).

- ``genesis``  the swarm's parameters and run id (``GenesisOptions``: the settings tools share)
- ``codec``    one-byte quantisation and the public scale rule
- ``chain``    ``ChainState`` = replay(genesis, records); record and contribution validation
- ``protocol`` ``NodeCore``: rounds, aggregation, verification, fork choice, sync; its effects
  (``effects``); catch-up in ``syncing``, joining and leaving in ``membership``; fork choice in
  ``forks``, record verification in ``verify``, sync rules in ``sync``, checkpoint download in
  ``joinplan``, peer policy in ``peers``, join work and difficulty in ``admission``
"""
