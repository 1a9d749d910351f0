"""The entry points: a cache (or a model and its input) in, a result out.

- `attribute`: ALTI / ALTI+ contributions of every layer and head, with rollout;
- `logit_attribution`: ALTI-Logit, a logit (difference) split over layers, heads and input tokens;
- `routes`: information-flow routes of one prediction;
- `context_attribution`: which units of a context made a decoder give its response;
- `attention_rollout`, `hook_names`.

Each module here is a short orchestration over shared steps: reading (`lens_alti.reading`), the
mathematics (`lens_alti.alti`) and the result objects (`lens_alti.results`).
"""

from lens_alti.api.attribute import attention_rollout, attribute, hook_names
from lens_alti.api.context import context_attribution
from lens_alti.api.logit import logit_attribution
from lens_alti.api.routes import routes

__all__ = ["attention_rollout", "attribute", "context_attribution", "hook_names", "logit_attribution", "routes"]
