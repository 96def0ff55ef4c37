import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "real_model: uses real models/text fetched from PyPI by hf_quant.assets "
        "(slow on a cold cache; deselect with -m 'not real_model')",
    )
