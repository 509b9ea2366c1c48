"""The built-in demo repository, built on first use from data that ships with scikit-learn.

Models: ``digits`` (MLP, served from PNG images), ``breast-cancer`` (tabular, named features),
``diabetes`` (regression with a 90% conformal interval), ``iris``; plus ``silero-vad`` when the
silero-vad package is installed. Each records its held-out score in model.yaml's ``metrics``.

Usage::

    path = forwardpass.demo.repository()   # builds into $FORWARDPASS_HOME/demo (or the user cache) once
"""

from forwardpass.demo.build import DEMO_VERSION, build, home, repository, write_samples

__all__ = ["DEMO_VERSION", "build", "home", "repository", "write_samples"]
