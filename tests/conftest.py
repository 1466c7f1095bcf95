"""Fixtures shared by the test files."""
import pytest


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> str:
    """The scikit-learn digits demo set (1,497 train / 300 val 32x32 JPEGs, 10 classes) prepared once per
    test session, in both the folder and the zip layout; the path of its root."""
    from data.digits import prepare_digits

    root = str(tmp_path_factory.mktemp("digits_data") / "digits")
    prepare_digits(root)
    return root
