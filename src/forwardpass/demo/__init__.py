"""The built-in demo repository, built on first use from data that ships with scikit-learn.

Models: ``digits`` (MLP, served from PNG images, trained to read digits drawn larger, thicker,
thinner or a pixel off centre), ``breast-cancer`` (tabular, named features), ``diabetes``
(regression with a 90% conformal interval), ``iris``; plus ``silero-vad``, ``smollm2`` and ``smollm2-embed`` (sentence
embeddings) when their packages are installed. Each records its held-out score in model.yaml's ``metrics``
(digits: ``accuracy`` on the clean held-out images, ``accuracy_varied`` on varied ones).

Usage::

    path = forwardpass.demo.repository()   # builds into $FORWARDPASS_HOME/demo (or the user cache) once
    path = forwardpass.demo.repository(progress=print)   # a line per model while it builds
    forwardpass.demo.left_out()            # why a model is missing, and the pip command that adds it
"""

from forwardpass.demo.build import DEMO_VERSION, build, home, left_out, repository, write_samples

__all__ = ["DEMO_VERSION", "build", "home", "left_out", "repository", "write_samples"]
