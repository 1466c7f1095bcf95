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


@pytest.fixture(scope="session")
def two_epoch_run(digits_root, tmp_path_factory) -> str:
    """An output folder holding a finished 2-epoch run of the small demo model (checkpoints at epoch ends, a best
    checkpoint, metrics, config), made once per session; copy it before changing anything in it."""
    import main as driver
    from tests.test_run_history import DEMO, TWO_EPOCHS

    output = tmp_path_factory.mktemp("two_epoch_run")
    assert driver.cli(["--cfg", DEMO, "--data-path", digits_root, "--output", str(output), "--opts"] + TWO_EPOCHS) == 0
    return str(output)
