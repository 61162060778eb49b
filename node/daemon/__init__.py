"""The networked node: an asyncio driver of the core over libp2p, and what it persists.

- ``daemon``   the driver: lifecycle, effects to transport, timers, record side effects
- ``store``    the crash-safe append-only chain store
- ``config``   node settings (command line and TOML)
- ``metrics``  Prometheus exposition and the status endpoint
"""
