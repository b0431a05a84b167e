"""Models, data, the training loop and checkpoints."""
import skiptron.parallel  # noqa: F401  (chooses DeepSpeed's accelerator before anything imports DeepSpeed)
