"""The plain-torch twins of fastnin.models (they live in fastnin/models/twins.py, where the
benchmarks reach them through fastnin.models.twin()); re-exported for the tests."""

from fastnin.models.twins import *  # noqa: F401,F403
from fastnin.models.twins import Inception, Residual, nin_block, resnet_block, vgg  # noqa: F401
