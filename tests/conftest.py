"""Test-session settings: the tiny models run fastest on one torch thread (on 2 shared cores, two threads per
tiny op mostly add synchronisation), and every test stays offline. `datasets` caches into a folder of this
session (removed at exit), not ~/.cache; set before anything imports `datasets`, which reads it at import."""

import atexit
import os
import shutil
import tempfile

if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="shira-tests-hf-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402 -- after the environment defaults

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
