import pytest

from tests.training import PROMPTS


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """:data:`tests.training.PROMPTS` in a prompts file, one a line (``finetune --prompts``)."""
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p
