"""The plain-torch twins of fastnin.models (they live in fastnin/models/twins.py, where the
benchmarks reach them through fastnin.models.twin()); every name of that module, private
helpers included, re-exported for the tests."""

import fastnin.models.twins as _twins

globals().update({k: v for k, v in vars(_twins).items() if not k.startswith("__")})
