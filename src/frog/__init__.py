"""frog: multi-tangent forward gradients for PyTorch.

Gradient estimates from k directional derivatives (jvps) computed in forward mode, combined by
orthogonal projection onto the span of the tangents ("frog") or by sum/mean.
"""

from .activity import describe_blocks
from .activity_perturbation import ActivityPerturbation
from .aggregation import METHODS, aggregate, coefficients, scale_correction
from .engines import ENGINES, FiniteDifferenceEngine, JvpEngine, LoopEngine, SimEngine
from .errors import CheckpointError, ForwardModeError, NonFiniteError
from .estimator import ForwardGradient
from .guesses import GuessSource, LocalHeads, TopDown
from .interface import GradientEstimator
from .layouts import combine
from .local import LocalLearning
from .mezo import MeZO
from .tangents import KINDS, TangentPlan, sample_tangents
from .training.functions import FUNCTIONS, get_function, rosenbrock, sphere, styblinski_tang
from .weight_perturbation import WeightPerturbation

__version__ = "0.1.0"  # the one place; pyproject.toml reads it, CHANGELOG.md says what changed

__all__ = [
    "ENGINES",
    "FUNCTIONS",
    "KINDS",
    "METHODS",
    "ActivityPerturbation",
    "CheckpointError",
    "FiniteDifferenceEngine",
    "ForwardGradient",
    "ForwardModeError",
    "GradientEstimator",
    "GuessSource",
    "JvpEngine",
    "LocalHeads",
    "LocalLearning",
    "LoopEngine",
    "MeZO",
    "NonFiniteError",
    "SimEngine",
    "TangentPlan",
    "TopDown",
    "WeightPerturbation",
    "aggregate",
    "coefficients",
    "combine",
    "describe_blocks",
    "get_function",
    "rosenbrock",
    "sample_tangents",
    "scale_correction",
    "sphere",
    "styblinski_tang",
]
