"""Operating a server: API keys with tiers (keys.py), shared rate limits (limits.py), usage metering (usage.py).

Where their files live unless a setting says otherwise: forwardpass's own folder ($FORWARDPASS_HOME, else the
user cache folder), as the demo repository.
"""

from __future__ import annotations

from pathlib import Path


def default_keys_file() -> Path:
    """keys.yaml where ``forwardpass keys create`` writes and ``forwardpass serve`` looks."""
    from forwardpass.demo.build import home

    return home() / "keys.yaml"


def default_state_dir() -> Path:
    """The folder of usage.sqlite and limits.bin."""
    from forwardpass.demo.build import home

    return home() / "state"
