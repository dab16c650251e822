"""Input data: datasets, the reference's augmentations, Grain pipelines, preparation tools."""

from mlseg_jax.data.datasets import DATASET_NAMES
from mlseg_jax.data.datasets import Dataset
from mlseg_jax.data.datasets import dataset_info
from mlseg_jax.data.datasets import default_config
from mlseg_jax.data.datasets import get_dataset
from mlseg_jax.data.pipeline import checkpoint_args
from mlseg_jax.data.pipeline import make_global_batch
from mlseg_jax.data.pipeline import make_train_iterator
