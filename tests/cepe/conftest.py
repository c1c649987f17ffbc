import pytest

from easy_context.world.default import build_default_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> str:
    """The built-in tiny model and tokenizer (random weights, 256 positions), built once for the CEPE tests."""
    return build_default_world(str(tmp_path_factory.mktemp("world") / "tiny"), max_position_embeddings=256)
