"""The public API is exactly what __all__ lists; changing it is a deliberate act."""

import forwardpass

EXPECTED = {
    "ForwardpassError", "InvalidInput", "InvalidModelName", "MissingDependency", "Model", "ModelConfig",
    "ModelConfigError", "ModelLoadError", "ModelNotFound", "ModelNotReady", "Repository", "UntrustedFile",
    "VersionStatus", "__version__", "default_repository", "load",
}  # fmt: skip


def test_all_is_the_public_api():
    assert set(forwardpass.__all__) == EXPECTED
    for name in forwardpass.__all__:
        assert hasattr(forwardpass, name), name


def test_public_names_have_docstrings():
    for name in forwardpass.__all__:
        obj = getattr(forwardpass, name)
        if callable(obj):
            assert obj.__doc__, f"{name} needs a docstring"
