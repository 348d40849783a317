"""Test-session settings: the tiny models run fastest on one torch thread (on 2 shared cores, two threads per
tiny op mostly add synchronisation), and every test stays offline."""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
