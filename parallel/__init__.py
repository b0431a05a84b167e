"""Process groups and communication. Importing it picks DeepSpeed's accelerator before DeepSpeed loads."""
import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
