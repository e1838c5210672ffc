import os
import warnings

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ["COLUMNS"] = "200"  # rich renders tables at full width under CliRunner
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(2)


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture
def cli(runner):
    """Run the CLI in-process: cli("export", "shvit_s1", ...) → Result (exit_code, output)."""
    from edgevit_export.cli import app

    def run(*args):
        return runner.invoke(app, [str(a) for a in args])

    return run
