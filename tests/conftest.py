import os
import warnings

import pandas as pd
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*Full backward hook.*")
warnings.filterwarnings("ignore", category=UserWarning, module="opacus")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from dpsynth.data.demo import write_demo

    d = tmp_path_factory.mktemp("demo")
    write_demo(d)
    return d


@pytest.fixture(scope="session")
def schema():
    from dpsynth.data.demo import demo_schema

    return demo_schema()


@pytest.fixture(scope="session")
def train_df(demo_dir, schema):
    from dpsynth.schema import validate_frame

    return validate_frame(pd.read_csv(demo_dir / "train.csv"), schema, "train.csv")


@pytest.fixture(scope="session")
def small_df(train_df):
    """2,048 patients: fast DP training in tests (q = 1/8 at batch 256)."""
    return train_df.iloc[:2048].reset_index(drop=True)
